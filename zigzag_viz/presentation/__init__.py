"""Charts (`charts`, Plotly, pure functions of arrays and frames) and the Streamlit helpers of the pages
(`ui`, the only module of the package that imports Streamlit)."""
