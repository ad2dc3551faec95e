"""Schemathesis over the server's own /openapi.json: no 5xx, responses as documented.

    python scripts/fuzz_api.py [--max-examples 25] [--max-time 240]

Starts `fsrl serve` on a tiny random model (loopback, a free port), runs schemathesis on valid
data and on data the schema forbids (`--mode all`) with the checks `not_a_server_error`,
`response_schema_conformance`, `content_type_conformance` and `negative_data_rejection` (what
the schema forbids must be refused with a 4xx), stops the server by its PID and exits with
schemathesis's status (0: every check passed).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _harness import start_tiny_server

CHECKS = ("not_a_server_error,response_schema_conformance,content_type_conformance,"
          "negative_data_rejection")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=25, help="test cases per operation")
    parser.add_argument("--max-time", type=int, default=240, help="seconds for the whole run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", type=Path, help="write schemathesis's JUnit report here")
    args = parser.parse_args(argv)
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    if cli is None:
        print("fuzz_api: schemathesis is not installed (pip install -e '.[dev]')", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="fsrl-fuzz-") as tmp:
        # A small token cap keeps every generated request short.
        _, server = start_tiny_server(Path(tmp), "--max-new-tokens-cap", "8")
        try:
            cmd = [cli, "run", f"{server.url}/openapi.json", "--checks", CHECKS,
                   "--max-examples", str(args.max_examples), "--max-time", str(args.max_time),
                   "--seed", str(args.seed), "--workers", "1", "--request-timeout", "60",
                   "--mode", "all",  # valid data, and data the schema forbids (must be a 4xx)
                   "--generation-database", "none", "--no-color", "--suppress-health-check", "all"]
            if args.report:
                cmd += ["--report", "junit", "--report-junit-path", str(args.report.resolve())]
            print("$", " ".join(cmd), flush=True)
            code = subprocess.run(cmd, cwd=tmp, timeout=args.max_time + 120).returncode  # its cache stays in tmp
        finally:
            server.stop()
        if code != 0:
            print(f"--- server log tail ---\n{server.log_tail(60)}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
