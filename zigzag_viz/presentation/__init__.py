"""Charts (`charts`, Plotly, pure functions of arrays and frames), the pages' results (`views`), where the
pages run the model (`backends`: this process or a model server), and the Streamlit helpers of the pages (`ui`,
the only module of the package that imports Streamlit)."""
