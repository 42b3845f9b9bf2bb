"""The vision tower alone against transformers' (float32, tiny random weights): several images in one
call, equal ones side by side (one batched attention per run of equal segments), edge windows of
several sizes, and a two-frame grid (full attention stays within each frame)."""

from __future__ import annotations

import pytest
import torch

from dashchat.models.qwen2_vl_vision import VisionConfig, VisionTower, segment_attention, _runs

transformers = pytest.importorskip("transformers")

# (t, h, w) in patches: 70x70 has windows of 4x4, 4x3 and 3x3 merge units; two equal images in a row;
# a two-frame grid whose windows must not mix frames
GRIDS = [(1, 70, 70), (1, 20, 36), (1, 20, 36), (2, 18, 10), (1, 16, 16)]


def _pair(family: str) -> tuple[VisionTower, torch.nn.Module]:
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as q25
    from transformers.models.qwen2_vl import modeling_qwen2_vl as q2

    torch.manual_seed(0)
    if family == "qwen2.5-vl":
        raw = dict(depth=3, hidden_size=64, num_heads=4, intermediate_size=96, out_hidden_size=48, window_size=112,
                   fullatt_block_indexes=[1], hidden_act="silu")
        ref = q25.Qwen2_5_VisionTransformerPretrainedModel._from_config(q25.Qwen2_5_VLVisionConfig(**raw))
    else:
        raw = dict(depth=2, embed_dim=64, hidden_size=48, num_heads=4, mlp_ratio=2)
        ref = q2.Qwen2VisionTransformerPretrainedModel._from_config(q2.Qwen2VLVisionConfig(**raw))
    ours = VisionTower(VisionConfig.from_dict(raw, qwen25=family == "qwen2.5-vl", text_hidden=48))
    ours.load_weights(ref.state_dict().items())
    return ours.eval(), ref.float().eval()


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl"])
def test_tower_equals_transformers(family):
    ours, ref = _pair(family)
    rows = sum(t * h * w for t, h, w in GRIDS)
    patches = torch.randn(rows, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got = ours(patches, GRIDS)
        want = ref(patches, grid_thw=torch.tensor(GRIDS))
    want = want.pooler_output if hasattr(want, "pooler_output") else want
    assert [len(g) for g in got] == [t * h * w // 4 for t, h, w in GRIDS]
    torch.testing.assert_close(torch.cat(got), want, atol=1e-5, rtol=1e-4)


def test_segment_attention_runs_equal_one_call_per_segment():
    lengths = [64, 64, 64, 48, 48, 36, 100, 7]
    runs = _runs(lengths)
    assert runs == [(0, 3, 64), (192, 2, 48), (288, 1, 36), (324, 1, 100), (424, 1, 7)]
    q, k, v = torch.randn(3, sum(lengths), 2, 8, generator=torch.Generator().manual_seed(2)).unbind(0)
    got = segment_attention(q, k, v, runs)
    want, start = [], 0
    for n in lengths:
        part = (x[start:start + n].transpose(0, 1) for x in (q, k, v))
        want.append(torch.nn.functional.scaled_dot_product_attention(*part).transpose(0, 1).reshape(n, 16))
        start += n
    torch.testing.assert_close(got, torch.cat(want))
