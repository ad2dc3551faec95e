"""start the steering server

`fsrl serve`, added to the `fsrl` command through the `fsrl.commands` entry point (pyproject).
Heavy imports stay inside `run`: the `fsrl` command reads this module's docstring for its help."""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import logging
from pathlib import Path

from fsrl.errors import FsrlError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Defaults are None so FSRL_* environment variables apply when a flag is left out.
    parser.add_argument("--model", help="transformers folder, .gguf file or hub name "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--sae", help="SAE: a folder in any format docs/models.md lists, or a sae-lens "
                        "registry name RELEASE/SAE_ID (default: the shipped SAE)")
    parser.add_argument("--layer", type=int, help="hook layer (default: the SAE's hook layer)")
    parser.add_argument("--adapters-dir", help="folder of adapter folders (default: ./adapters)")
    parser.add_argument("--host", help="bind address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: 8000)")
    parser.add_argument("--device", help="auto | cpu | cuda (default: auto)")
    parser.add_argument("--max-new-tokens-cap", type=int,
                        help="largest max_new_tokens a request may ask for (default: 1024)")
    parser.add_argument("--max-queue", type=int,
                        help="requests admitted at once before answering 503 (default: 64)")
    parser.add_argument("--max-prompt-tokens", type=int,
                        help="longest prompt accepted, in tokens (default: 4096)")
    parser.add_argument("--max-request-bytes", type=int,
                        help="largest request body accepted (default: 1048576)")
    parser.add_argument("--max-batch-rows", type=int,
                        help="rows decoding together; a compare request is two (default: 16)")
    parser.add_argument("--max-adapters-on-device", type=int,
                        help="adapters kept on the device; the rest wait in host memory and move "
                             "in when asked for, least recently used out (default: 0, no limit)")
    parser.add_argument("--pack-cpu-weights", action=argparse.BooleanOptionalAction,
                        help="on a CPU, pack the model's, SAE's and adapters' weights once for "
                             "oneDNN, so a batch of several rows costs about one row (default: on; "
                             "--no-pack-cpu-weights serves the plain weights)")
    # Removed (#13: one fast path): a clear line instead of argparse's "unrecognized arguments".
    parser.add_argument("--compile-decode", "--no-compile-decode", "--static-cache-tokens",
                        dest="removed_compile_decode", nargs="?", const=True, default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("--max-adapters", type=int,
                        help="adapters loaded at once; a load beyond it gets 409 (default: 64)")
    parser.add_argument("--stream-send-timeout", type=float,
                        help="seconds a streaming client may read nothing before it is cut off "
                             "(default: 60)")
    parser.add_argument("--insecure-no-auth", action="store_true", default=None,
                        help="serve a non-loopback --host without FSRL_API_KEY (refused otherwise): "
                             "anyone who reaches the port can generate and swap adapters")
    parser.add_argument("--engine", choices=["transformers", "vllm"],
                        help="what runs the model: fsrl's own continuous batching over transformers, "
                             "or vLLM with the steering compiled into its model (needs "
                             "pip install 'fsrl[vllm]'; docs/vllm.md) (default: transformers)")
    parser.add_argument("--tensor-parallel-size", type=int,
                        help="with --engine vllm: GPUs (ranks) the model is split over (default: 1)")
    parser.add_argument("--enforce-eager", action="store_true", default=None,
                        help="with --engine vllm: run without vLLM's compiled graph (starts faster, "
                             "decodes slower)")


# h11, whatever else is installed: with httptools (which vLLM brings) uvicorn would pick it, and
# it answers a request with an unknown method with its own bare 400 before the app sees it,
# instead of the contract's JSON 405.
HTTP_PARSER = "h11"


class _NoStartupTraceback(logging.Filter):
    """uvicorn logs a failed lifespan as its traceback; `run` reports the reason in one line
    instead (with -v the traceback stays)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Traceback (most recent call last)")


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _preflight(settings) -> None:
    """Mistakes found before anything loads, each in one line."""
    if settings.api_key is None and not settings.insecure_no_auth and not is_loopback(settings.host):
        raise FsrlError(f"refusing to serve on {settings.host} without an API key: anyone who reaches "
                        "it could generate and swap adapters. Set FSRL_API_KEY (and FSRL_ADMIN_KEY), "
                        "or pass --insecure-no-auth if this network is yours alone")
    if settings.device not in ("auto", "cpu") and not settings.device.startswith("cuda"):
        raise FsrlError(f"--device must be auto, cpu or cuda, got {settings.device!r}")
    model = settings.model
    if model and model.startswith(("/", ".", "~")) and not Path(model).expanduser().exists():
        raise FsrlError(f"model not found: {model}")
    if settings.engine == "vllm":
        from fsrl.models import packaged_model

        if model and not (packaged_model(model) or Path(model).expanduser().is_dir()):
            raise FsrlError("--engine vllm serves a transformers model folder or a packaged model "
                            f"(fsrl fetch-default --list), not {model!r}")
        if importlib.util.find_spec("vllm") is None:
            raise FsrlError("--engine vllm needs vLLM installed: pip install 'fsrl[vllm]' (docs/vllm.md)")
    elif settings.tensor_parallel_size > 1 or settings.enforce_eager:
        raise FsrlError("--tensor-parallel-size and --enforce-eager are for --engine vllm")
    sae = str(settings.sae_path)
    if Path(sae).exists() or sae.startswith(("/", ".", "~")) or "/" not in sae:
        from fsrl.sae_formats import detect_format

        if not Path(sae).exists():
            raise FsrlError(f"no SAE at {sae}; pass --sae DIR (or a sae-lens registry name RELEASE/SAE_ID)")
        detect_format(Path(sae))  # one line now, not after the model has loaded


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app
    from server.settings import load_settings

    if args.removed_compile_decode is not None:
        raise FsrlError("--compile-decode and --static-cache-tokens were removed: the compiled fast "
                        "path is --engine vllm (docs/vllm.md)")
    settings = load_settings(
        model=args.model, sae=args.sae, layer=args.layer, adapters_dir=args.adapters_dir,
        host=args.host, port=args.port, device=args.device,
        max_new_tokens_cap=args.max_new_tokens_cap, max_queue=args.max_queue,
        max_batch_rows=args.max_batch_rows, max_adapters_on_device=args.max_adapters_on_device,
        max_prompt_tokens=args.max_prompt_tokens, max_request_bytes=args.max_request_bytes,
        pack_cpu_weights=args.pack_cpu_weights, max_adapters=args.max_adapters,
        stream_send_timeout=args.stream_send_timeout, insecure_no_auth=args.insecure_no_auth,
        engine=args.engine, tensor_parallel_size=args.tensor_parallel_size, enforce_eager=args.enforce_eager)
    _preflight(settings)
    if not getattr(args, "verbose", False):
        logging.getLogger("uvicorn.error").addFilter(_NoStartupTraceback())

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:  # log the port really bound (--port 0 picks one)
                port = next((s.getsockname()[1] for srv in self.servers for s in srv.sockets),
                            settings.port)
                url = f"http://{settings.host}:{port}"
                log.info("fsrl server ready at %s (playground: %s/playground, health: %s/health)", url, url, url)

    # log_config=None: uvicorn's loggers go through the CLI's logging setup.
    app = create_app(settings)
    server = Server(uvicorn.Config(app, host=settings.host, port=settings.port, http=HTTP_PARSER,
                                   log_config=None, timeout_graceful_shutdown=10))
    try:
        server.run()
    except SystemExit:  # uvicorn's way out of a failed startup; the reason is reported below
        pass
    if not server.started:
        reason = getattr(app.state, "startup_error", None) or "see the log above"
        raise FsrlError(f"the server did not start: {reason}")
    return 0
