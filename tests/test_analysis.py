"""Feature push measured on activations: exact numbers on a hand-built adapter."""

import torch

from fsrl.sites import Site
from fsrl.testing import tiny_base, tiny_sae
from fsrl.adapter import new_adapter
from fsrl.analysis import feature_push, hook_activations, reference_token_ids, top_features


def test_feature_push_is_the_mean_of_v_and_of_abs_v_and_the_share_of_tokens_it_is_nonzero_on():
    sae = tiny_sae(d_in=4, d_sae=6)
    adapter = new_adapter("hand", sae, "m", "f", layer=1)
    with torch.no_grad():
        adapter.W.zero_()
        adapter.b_in.zero_()                                # x is read as given
        adapter.W[0, 1] = 1.0                               # feature 1 follows x[0]
        adapter.b.copy_(torch.tensor([0.5, 0.0, -1.0, 2.0, 0.0, 0.0]))
    x = torch.tensor([[1.0, 0, 0, 0], [-3.0, 0, 0, 0], [2.0, 0, 0, 0], [0.0, 0, 0, 0]])
    push = feature_push(adapter, x, chunk=3)  # chunks that do not divide N
    # relu: feature 0 is 0.5 everywhere, 3 is 2.0, 2 never fires, 1 is relu(x0) = 1, 0, 2, 0
    assert push.mean_v.tolist() == [0.5, 0.75, 0.0, 2.0, 0.0, 0.0]
    assert push.mean_abs_v.tolist() == push.mean_v.tolist()  # relu: v >= 0
    assert push.active_share.tolist() == [1.0, 0.5, 0.0, 1.0, 0.0, 0.0]
    ranked = top_features(push, sae, k=3)
    assert [f["index"] for f in ranked] == [3, 1, 0] and ranked[0]["mean_v"] == 2.0


def test_rankings_use_mean_abs_v_so_opposite_pushes_do_not_cancel():
    sae = tiny_sae(d_in=4, d_sae=6)
    adapter = new_adapter("signed", sae, "m", "f", layer=1, activation="soft_threshold")
    with torch.no_grad():
        adapter.W.zero_()
        adapter.b_in.zero_()
        adapter.b.zero_()
        adapter.tau.zero_()
        adapter.W[0, 2] = 3.0                               # feature 2: +3 x0, either sign
        adapter.W[1, 4] = 1.0                               # feature 4: +x1, positive only here
    x = torch.tensor([[1.0, 1.0, 0, 0], [-1.0, 1.0, 0, 0]])
    push = feature_push(adapter, x)
    assert push.mean_v[2] == 0.0 and push.mean_abs_v[2] == 3.0  # +3 and -3 cancel in the mean
    assert [f["index"] for f in top_features(push, sae, k=2)] == [2, 4]


def test_hook_activations_are_the_layer_output_without_the_first_token():
    base = tiny_base()
    ids = reference_token_ids(base.tokenizer, limit=3)
    got = hook_activations(base, Site(1), ids)
    assert got.shape == (sum(len(i) - 1 for i in ids), base.d_model)
    out = base.model(input_ids=torch.tensor([ids[0]]), output_hidden_states=True)
    torch.testing.assert_close(got[:len(ids[0]) - 1], out.hidden_states[2][0, 1:])
