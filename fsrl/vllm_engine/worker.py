"""Methods vLLM adds to each of its workers (`worker_extension_cls`), called on every rank at
once through `LLM.collective_rpc(name, args=...)`."""

from __future__ import annotations

from fsrl.adapter import load_adapter
from fsrl.vllm_engine import COUNTERS


class SteeringWorkerExtension:
    """Mixed into vLLM's worker class: `self.model_runner.model` is the steered model."""

    def _fsrl_site(self):
        return self.model_runner.model.fsrl_site

    def fsrl_load_adapter(self, adapter_id: str, folder: str) -> int:
        """Load an adapter into a free bank slot, in place (the compiled graph keeps reading
        the bank where it is); returns the slot."""
        site = self._fsrl_site()
        return site.load_adapter(adapter_id, load_adapter(folder, sae=site.sae,
                                                          layer=self.model_runner.model.fsrl_layer))

    def fsrl_counters(self) -> dict[str, int]:
        """How often `prepare_step` wrote the buffers, and how often the steering site's Python
        ran outside a compiled graph (0 when the compiled graph ran every step)."""
        return dict(COUNTERS)
