"""Methods vLLM adds to each of its workers (`worker_extension_cls`), called on every rank at
once through `LLM.collective_rpc(name, args=...)` (or `AsyncLLM.collective_rpc`)."""

from __future__ import annotations

from pathlib import Path

from fsrl.adapter import WEIGHTS_FILE, load_adapter
from fsrl.errors import FsrlError
from fsrl.files import sha256_of
from fsrl.vllm_plugin import COUNTERS


class SteeringWorkerExtension:
    """Mixed into vLLM's worker class: `self.model_runner.model` is the steered model."""

    def _fsrl_site(self):
        return self.model_runner.model.fsrl_site

    def fsrl_load_adapter(self, key: str, folder: str, weights_sha256_16: str | None = None) -> None:
        """Load a version into this worker's host memory (not into the bank: `fsrl_page` does).
        With `weights_sha256_16`, the weights file must still be the one the caller checked
        (every rank reads the same version)."""
        site = self._fsrl_site()
        if weights_sha256_16 is not None and sha256_of(Path(folder) / WEIGHTS_FILE, 16) != weights_sha256_16:
            raise FsrlError(f"the weights of adapter {key!r} changed on disk while it was loading")
        # In the bank's dtype (the model's): the host copy holds what a page-in copies, no more.
        site.keep(key, load_adapter(folder, sae=site.sae, layer=self.model_runner.model.fsrl_layer,
                                    dtype=site.bank.W.dtype))

    def fsrl_page(self, evict: list[str], page_in: list[str]) -> None:
        """Send `evict` out of the bank, then copy `page_in` in from host memory, in place (the
        compiled graph keeps reading the bank where it is). No running request names `evict`."""
        self._fsrl_site().page(evict, page_in)

    def fsrl_unload_adapter(self, key: str) -> None:
        """Forget a version: its host copy and its bank slot (no running request names it)."""
        self._fsrl_site().drop(key)

    def fsrl_take_features(self, key: str) -> list[dict]:
        """What the graph captured for each token the request sampled since the last take:
        `{"features": [(index, delta), ...] | None, "telemetry": {...} | None}`."""
        return self._fsrl_site().features.pop(key, [])

    def fsrl_take_fired(self, key: str) -> tuple[int, int] | None:
        """(feature, generated tokens kept) once an `abort_when` condition of the request passed."""
        return self._fsrl_site().fired.pop(key, None)

    def fsrl_counters(self) -> dict[str, int]:
        """How often `prepare_step` wrote the buffers, and how often the steering site's Python
        ran outside a compiled graph (0 when the compiled graph ran every step)."""
        return dict(COUNTERS)
