"""The model server and the clients for it.

`api`: the request bodies and the JSON reports shared by `zigzag-viz analyze|compare --json` and the server;
`jobs`: one worker thread per loaded model running its queued jobs in order; `server`: the FastAPI app
(`create_app`) behind `zigzag-viz serve`; `client`: what `zigzag-viz analyze|compare --backend URL` and the app's
remote backend call; `wire`: the pages' results as exact JSON, without pickle.
"""
