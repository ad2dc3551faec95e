from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query

from fsrl.errors import NotFoundError
from fsrl.features.classes import CLASSES
from server.contrasts import render_contrast, run_contrast
from server.deps import StateDep
from server.schemas import ContrastBody

router = APIRouter(prefix="/features", tags=["features"])


@router.get("")
async def search_features(state: StateDep, q: Annotated[str, Query(min_length=1, max_length=200)],
                          limit: Annotated[int, Query(ge=1, le=100)] = 20,
                          feature_class: Annotated[Literal[CLASSES] | None, Query(alias="class")] = None) -> dict:
    """Features whose label, peak tokens or promoted tokens hold `q` (case-insensitive), best
    first; `class` keeps one class (alignment, style, other)."""
    return {"query": q, "features": state.features.search(q, limit, feature_class)}


@router.post("/contrast")
async def contrast_features(body: ContrastBody, state: StateDep) -> dict:
    """The features that tell two sets of texts apart, ranked by |mean_a - mean_b| over
    texts, with Cohen's d, Welch's p-value, labels and classes."""
    found = await run_contrast(state, body.a, body.b, body.top)
    return {"a_texts": len(body.a), "b_texts": len(body.b), "site": str(state.site),
            "features": render_contrast(state, found)}


@router.get("/{index}")
async def feature(state: StateDep, index: Annotated[int, Path(ge=0, le=2**31 - 1)]) -> dict:
    """One feature's label and dashboard."""
    if index >= state.sae.d_sae:
        raise NotFoundError(f"feature {index} is out of range [0, {state.sae.d_sae})")
    return state.features.card(index)
