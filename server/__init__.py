"""The fsrl steering server: a FastAPI app over `fsrl/` (model, SAE, adapters, generation).

Layout (FastAPI full-stack template, vLLM-style layers):
    cli.py       `fsrl serve`: settings from flags and FSRL_* env, then uvicorn
    settings.py  pydantic-settings
    app.py       builds the app; heavy things load in its lifespan (state.py)
    deps.py      Annotated dependencies: the server state, API and admin keys
    errors.py    the server's error types (plain exceptions)
    http_errors.py  every error type -> status, type, code; the handlers that shape every error
    params.py    what a request asks for, as plain data (GenerateParams)
    schemas.py   pydantic request models -> params (a leaf: no torch, no engine)
    openai_schemas.py  the same for the OpenAI routes
    render.py, openai_render.py  results -> the contract's JSON and OpenAI's shapes
    serving.py   a request's journey: tokenise, resolve adapter, build rows, collect results
    model_thread.py  the one thread that runs the model (torch's threads held there)
    engine.py    the engine face (GenerationEngine) and fsrl's own: continuous batching on the model thread
    vllm_engine.py  the same face over vLLM (--engine vllm)
    contrasts.py  feature contrasts and constant adapters
    registry.py  adapters: load at start, hot swap by reference
    routes/      thin handlers, one file per resource
"""
