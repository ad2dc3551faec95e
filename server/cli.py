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
    """One flag per `Settings` field (server/settings.py: help and defaults are written there)."""
    from server.settings import flag_specs

    for spec in flag_specs():
        if "help" in spec.kwargs:  # the secrets are environment variables only
            parser.add_argument(spec.flag, dest=spec.name, **{"default": None, **spec.kwargs})
    # Removed (#13: one fast path): a clear line instead of argparse's "unrecognized arguments".
    parser.add_argument("--compile-decode", "--no-compile-decode", "--static-cache-tokens",
                        dest="removed_compile_decode", nargs="?", const=True, default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("--max-adapters-on-device", dest="removed_on_device", default=None, help=argparse.SUPPRESS)


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
    from server.settings import flag_specs, load_settings

    if args.removed_compile_decode is not None:
        raise FsrlError("--compile-decode and --static-cache-tokens were removed: the compiled fast "
                        "path is --engine vllm (docs/vllm.md)")
    if args.removed_on_device is not None:
        raise FsrlError("--max-adapters-on-device was renamed --adapter-slots: adapters held on the device, "
                        "the others paged in from host memory")
    settings = load_settings(**{spec.name: getattr(args, spec.name, None) for spec in flag_specs()})
    _preflight(settings)
    # torch, transformers and the app only now: a mistake above is one line in well under a second.
    import uvicorn

    from server.app import create_app

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
