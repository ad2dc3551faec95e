"""The fsrl steering server: a FastAPI app over `fsrl/` (model, SAE, adapters, generation).

Layout (FastAPI full-stack template, vLLM-style layers):
    cli.py       `fsrl serve`: settings from flags and FSRL_* env, then uvicorn
    settings.py  pydantic-settings
    app.py       builds the app; heavy things load in its lifespan (state.py)
    deps.py      Annotated dependencies: the server state, API and admin keys
    errors.py    typed HTTP errors and the one handler that shapes every error
    schemas.py   pydantic request models -> internal dataclasses; response rendering
    serving.py   a request's journey: tokenise, resolve adapter, build rows, collect results
    engine.py    runs generation off the event loop (async face; batching engine later)
    registry.py  adapters: load at start, hot swap by reference
    routes/      thin handlers, one file per resource
"""
