"""The in-LLM stage (fastv, pdrop, sparsevlm, dart at layer K) against hand-built references, tiny models."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import mmtok
from mmtok.adapters.llm_stage import generate_with_llm_pruning
from mmtok.compressors import Compressor
from mmtok.compressors.sparsevlm import dpc_knn, select_raters

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402

GEN = {"max_new_tokens": 3, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
B, L, D = 2, 20, 32
VIS = ((4, 14), (6, 12))  # row 0: 10 visual tokens, row 1 (3 padding tokens): 6
BUDGET = [4, 3]


def _text_cfg() -> dict:
    return {"vocab_size": 64, "hidden_size": D, "intermediate_size": 64, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "pad_token_id": 0}


def _build(kind: str, attn: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**_text_cfg(), attn_implementation=attn)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**_text_cfg(), attn_implementation=attn)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        text = {**_text_cfg(), "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                   "mrope_section": [2, 1, 1]}}
        cfg = transformers.Qwen2VLConfig(text_config=text, vision_config={"depth": 1, "embed_dim": 16,
                                         "hidden_size": D, "num_heads": 2}, attn_implementation=attn)
        model = transformers.Qwen2VLForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    return model.eval()


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {k: _build(k) for k in ("llama", "qwen2", "qwen2_vl")}


def _inputs(kind: str) -> dict:
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(B, L, D, generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    am[1, :3] = 0
    vis = torch.zeros(B, L, dtype=torch.bool)
    for b, (s, e) in enumerate(VIS):
        vis[b, s:e] = True
    pos = None
    if kind == "qwen2_vl":  # M-RoPE: the span is a (1, 2, n/2) grid, the text after it continues from max + 1
        pos = torch.zeros(3, B, L, dtype=torch.long)
        for b, (s, e) in enumerate(VIS):
            first = int(am[b].argmax())
            text0 = torch.arange(s - first)
            w = (e - s) // 2
            grid = torch.stack([torch.zeros(e - s), torch.arange(e - s) // w, torch.arange(e - s) % w]).long()
            after = torch.arange(L - e) + int(grid.max()) + len(text0) + 1
            for d in range(3):
                pos[d, b, first:] = torch.cat([text0, grid[d] + len(text0), after])
    return {"inputs_embeds": emb, "attention_mask": am, "visual_mask": vis, "position_ids": pos}


def _additive(valid: torch.Tensor, q_len: int) -> torch.Tensor:
    kv = valid.shape[1]
    causal = torch.arange(kv)[None, :] <= (torch.arange(q_len) + kv - q_len)[:, None]
    allowed = causal[None, None] & valid[:, None, None, :]
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


def _reference(model, inputs: dict, drops: list[tuple[int, list[torch.Tensor]]], steps: int = 3):
    """Explicit per-layer run: layers before each drop see their whole sequence, the rest the kept tokens.

    ``drops``: per stage, the drop layer and each row's kept visual positions from then on. Returns the
    logits of every greedy step ([B, V] each) and the KV lengths after the prefill.
    """
    dec, emb, pos = model.get_decoder(), inputs["inputs_embeds"], inputs["position_ids"]
    am, vis = inputs["attention_mask"], inputs["visual_mask"]
    pos = (am.cumsum(-1) - 1).clamp(min=0) if pos is None else pos
    cos, sin = dec.rotary_emb(emb, pos)
    cache = DynamicCache(config=dec.config)
    h, valid, orig = emb, am.bool(), torch.arange(L).expand(B, L)
    seq_of_layer, d_iter = [], iter(drops)
    nxt = next(d_iter, None)
    for i, layer in enumerate(dec.layers):
        if nxt is not None and nxt[0] == i:
            rows = [torch.sort(torch.cat([((am[b] == 1) & ~vis[b]).nonzero().flatten(), nxt[1][b]])).values
                    for b in range(B)]
            n_new = max(r.numel() for r in rows)
            slots = torch.zeros(B, n_new, dtype=torch.long)
            new_valid = torch.zeros(B, n_new, dtype=torch.bool)
            for b, r in enumerate(rows):
                where = [(orig[b] == p).nonzero()[-1].item() for p in r.tolist()]
                slots[b, n_new - len(where):], slots[b, : n_new - len(where)] = torch.tensor(where), where[0]
                new_valid[b, n_new - len(where):] = True
            h = h.gather(1, slots[..., None].expand(-1, -1, D))
            at = slots[..., None].expand(-1, -1, cos.shape[-1])
            cos, sin = (t.expand(B, -1, -1).gather(1, at) for t in (cos, sin))
            orig, valid = orig.gather(1, slots), new_valid
            nxt = next(d_iter, None)
        seq_of_layer.append(orig)
        h = layer(h, attention_mask=_additive(valid, h.shape[1]), position_embeddings=(cos, sin),
                  past_key_values=cache, use_cache=True)
    logits = [model.lm_head(dec.norm(h[:, -1]))]
    lengths = [c.keys.shape[-2] for c in cache.layers]
    for i, c in enumerate(cache.layers):  # keep, in every layer, the entries of the final kept positions
        where = [[(seq_of_layer[i][b] == p).nonzero()[-1].item() for p in orig[b].tolist()] for b in range(B)]
        idx = torch.tensor(where)[:, None, :, None]
        c.keys = c.keys.gather(2, idx.expand(-1, c.keys.shape[1], -1, c.keys.shape[-1]))
        c.values = c.values.gather(2, idx.expand(-1, c.values.shape[1], -1, c.values.shape[-1]))
    for t in range(1, steps):
        x = model.get_input_embeddings()(logits[-1].argmax(-1))[:, None]
        p = pos[..., -1:] + t
        cos, sin = dec.rotary_emb(x, p)
        valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool)], dim=1)
        for layer in dec.layers:
            x = layer(x, attention_mask=_additive(valid, 1), position_embeddings=(cos, sin),
                      past_key_values=cache, use_cache=True)
        logits.append(model.lm_head(dec.norm(x[:, -1])))
    return logits, lengths


def _run(model, kind: str, name: str, budget=BUDGET, at: int | None = None, **options):
    inputs = _inputs(kind)
    comp = mmtok.create_compressor(name, **options)
    with torch.no_grad():
        out, info = generate_with_llm_pruning(model, compressor=comp, budget=budget, layer=at, **inputs,
                                              **GEN)
    return inputs, out, info


def _check_against_reference(model, inputs, out, info) -> None:
    drops = [(s["drop_layer"], s["kept_positions"]) for s in info["stages"]]
    with torch.no_grad():
        ref, _ = _reference(model, inputs, drops)
    assert out.sequences.tolist() == torch.stack([r.argmax(-1) for r in ref], 1).tolist()
    for got, want in zip(out.logits, ref, strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def _hooks(model) -> dict[str, tuple[int, int]]:
    return {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()}


def _no_hooks_left(model, before: dict[str, tuple[int, int]]) -> None:
    # transformers may keep inert output-capturing forward hooks once hidden states were asked for; none
    # of ours survive, and no pre-hook at all is left on the decoder stack or its layers
    dec = model.get_decoder()
    assert _hooks(model) == before
    assert all(not m._forward_pre_hooks for m in [dec, *dec.layers]) and not dec._forward_hooks


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen2_vl"])
def test_fastv_matches_reference_and_eager_topk(models, kind):
    model = models[kind]
    before = _hooks(model)
    inputs, out, info = _run(model, kind, "fastv", layer=2)
    _check_against_reference(model, inputs, out, info)
    assert info["visual_after"] == BUDGET and info["visual_before"] == [10, 6]
    assert model.config._attn_implementation == "sdpa"
    assert model.get_decoder().config._attn_implementation == "sdpa"
    _no_hooks_left(model, before)
    # the kept set is the top-k of the last token's attention at layer K-1, from an eager run
    eager = _build(kind, attn="eager")
    eager.load_state_dict(model.state_dict())
    kw = {k: v for k, v in inputs.items() if k != "visual_mask" and v is not None}
    with torch.no_grad():
        att = eager(**kw, output_attentions=True).attentions[1]
    for b, (s, e) in enumerate(VIS):
        top = torch.topk(att[b, :, -1, s:e].mean(0), BUDGET[b]).indices.sort().values
        assert info["kept_visual"][b].tolist() == top.tolist()
        assert info["kept_positions"][b].tolist() == (top + s).tolist()


def test_dart_at_layer_2_matches_reference(models):
    inputs, out, info = _run(models["llama"], "llama", "dart")
    assert [(s["attn_layer"], s["drop_layer"]) for s in info["stages"]] == [(2, 2)]
    assert info["visual_after"] == BUDGET
    _check_against_reference(models["llama"], inputs, out, info)


def test_row_without_visual_tokens(models):
    model, inputs = models["qwen2_vl"], _inputs("qwen2_vl")
    inputs["visual_mask"][1] = False
    inputs["position_ids"] = None  # generate() numbers the prompt itself (text-only M-RoPE ids)
    with torch.no_grad():
        out, info = generate_with_llm_pruning(model, compressor=mmtok.create_compressor("fastv"), budget=4,
                                              **inputs, **GEN)
    assert info["visual_before"] == [10, 0] and info["visual_after"] == [4, 0]
    assert info["kv_lengths"] == [L - 10 + 4, L - 3]
    _check_against_reference(model, inputs, out, info)


def test_pdrop_stages_match_reference(models):
    inputs, out, info = _run(models["llama"], "llama", "pdrop")
    assert [s["drop_layer"] for s in info["stages"]] == [1, 2, 3]
    assert [s["counts"] for s in info["stages"]] == [[7, 5], [5, 4], [4, 3]]
    for a, b in zip(info["stages"], info["stages"][1:], strict=False):  # each stage keeps a subset
        pairs = zip(a["kept_positions"], b["kept_positions"], strict=True)
        assert all(set(y.tolist()) <= set(x.tolist()) for x, y in pairs)
    _check_against_reference(models["llama"], inputs, out, info)


def test_identity_at_layer_0_equals_stock_generate(models):
    model = models["qwen2"]
    inputs, out, info = _run(model, "qwen2", "identity", budget=1.0, at=0)
    kw = {k: v for k, v in inputs.items() if k != "visual_mask" and v is not None}
    with torch.no_grad():
        stock = model.generate(**kw, **GEN)
    assert torch.equal(out.sequences, stock.sequences)
    for got, want in zip(out.logits, stock.logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert info["kv_length"] == L and info["visual_after"] == [10, 6]


# ---------------------------------------------------------------- cache, hooks, attention kernel


@pytest.mark.parametrize("name", ["fastv", "pdrop", "sparsevlm"])
def test_kv_cache_has_the_reduced_length(models, name):
    _, out, info = _run(models["qwen2_vl"], "qwen2_vl", name)
    want = max(L - 10 + 4, L - 3 - 6 + 3)
    assert info["kv_length"] == want and info["kv_lengths"] == [L - 10 + 4, L - 3 - 6 + 3]
    # after 3 new tokens (2 fed back), every layer holds the kept prompt plus 2
    assert [c.keys.shape[-2] for c in out.past_key_values.layers] == [want + 2] * 4
    assert info["visual_after"] == BUDGET and info["timings"]["prefill"] > 0


def test_sparsevlm_recycles_into_merged_tokens(models):
    inputs, out, info = _run(models["llama"], "llama", "sparsevlm", budget=[5, 4], recycle_ratio=1.0,
                             cluster_ratio=0.5, layers=(1,))
    assert info["merged"] and info["visual_after"] == [5, 4]
    assert [(s["attn_layer"], s["drop_layer"]) for s in info["stages"]] == [(1, 2)]
    assert out.sequences.shape == (B, 3)


@dataclass
class _Boom(Compressor):
    paper = "test double"
    stage = "llm"
    stages = ("llm",)

    def plan_row(self, row, k, generator):
        raise RuntimeError("boom inside the prefill")


def test_hooks_are_removed_after_an_exception(models):
    model = models["llama"]
    before = _hooks(model)
    inputs = _inputs("llama")
    with pytest.raises(RuntimeError, match="boom"):
        generate_with_llm_pruning(model, compressor=_Boom(), budget=2, **inputs, max_new_tokens=2)
    _no_hooks_left(model, before)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"compressor": "random"}, "cannot run inside the LLM"),
        ({"options": {"layer": 4}}, "4 layers"),
        ({"budget": 11}, "larger than"),
        ({"num_beams": 2}, "num_beams"),
        ({"layer": 1}, "own layers"),
        ({"last_visual": True}, "last position"),
    ],
)
def test_bad_calls_fail_before_running(models, change, match):
    model = models["llama"]
    inputs = _inputs("llama")
    if change.get("last_visual"):
        inputs["visual_mask"][:, -1] = True
    comp = mmtok.create_compressor(change.get("compressor", "fastv"), **change.get("options", {}))
    extra = {k: v for k, v in change.items() if k in ("num_beams", "layer")}
    before = _hooks(model)
    with pytest.raises(ValueError, match=match):
        generate_with_llm_pruning(model, compressor=comp, budget=change.get("budget", 2), **inputs, **extra)
    _no_hooks_left(model, before)


# ---------------------------------------------------------------- the compressors as pure tensor code


def test_fastv_keeps_the_most_attended_tokens():
    score = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.3])
    tokens = mmtok.VisualTokens(torch.randn(5, 4), signals={"text_attn": score})
    assert mmtok.create_compressor("fastv")(tokens, 2).row_keep(0).tolist() == [1, 3]
    assert mmtok.create_compressor("pdrop")(tokens, 3).row_keep(0).tolist() == [1, 3, 4]
    with pytest.raises(ValueError, match="text_attn"):
        mmtok.create_compressor("fastv")(mmtok.VisualTokens(torch.randn(5, 4)), 2)


def test_pdrop_schedule_is_the_papers_pyramid():
    pd = mmtok.create_compressor("pdrop")
    assert pd.llm_schedule(576, 72, 32) == [(8, 8, 288), (16, 16, 144), (24, 24, 72)]
    assert mmtok.create_compressor("pdrop", ratio=0.5).llm_schedule(576, 100, 32)[-1] == (24, 24, 100)
    fixed = mmtok.create_compressor("pdrop", ratio=0.5).llm_schedule(576, 100, 32)
    assert [c for *_, c in fixed] == [288, 144, 100]
    with pytest.raises(ValueError, match="32 layers"):
        mmtok.create_compressor("pdrop", layers=(8, 40)).llm_schedule(576, 72, 32)
    assert mmtok.create_compressor("fastv").llm_schedule(576, 288, 32) == [(1, 2, 288)]
    assert mmtok.create_compressor("sparsevlm").llm_schedule(576, 64, 32)[0][:2] == (2, 3)


def test_sparsevlm_split_is_exact():
    sv = mmtok.create_compressor("sparsevlm")
    for n in (2, 7, 36, 576):
        for k in range(1, n):
            k_sel, groups = sv.split(n, k)
            assert k_sel + groups == k and k_sel >= 1 and groups <= n - k_sel


def test_sparsevlm_raters_scores_and_clusters():
    # visual tokens point at text token 0: it is the only rater
    text = torch.eye(4)[:3] * 5
    vis = torch.eye(4)[[0, 0, 0, 0, 0, 0]] * 5
    assert select_raters(vis, text).tolist() == [True, False, False]
    # two tight, far apart clusters
    x = torch.cat([torch.randn(5, 3) * 0.01, torch.randn(4, 3) * 0.01 + 10])
    centres, assign = dpc_knn(x, 2)
    assert sorted((centres >= 5).tolist()) == [False, True]
    assert assign[:5].unique().numel() == 1 and assign[5:].unique().numel() == 1 and assign[0] != assign[5]
    # the rater's attention decides the top 7; the next 2 best (of 5 pruned: 30 % + 1) merge into 1 group
    attn = torch.zeros(12, 3)
    attn[:, 0] = torch.arange(12.0)
    attn[:, 1] = -torch.arange(12.0)
    feats = torch.eye(4)[[0] * 12] * 5 + torch.randn(12, 4) * 0.01
    tokens = mmtok.VisualTokens(feats, text=text, signals={"text_attn_all": attn})
    plan = mmtok.create_compressor("sparsevlm")(tokens, 8)
    assert mmtok.create_compressor("sparsevlm").split(12, 8) == (7, 1)
    assert plan.counts.tolist() == [8] and plan.merging
    assert set(range(5, 12)) <= set(plan.row_keep(0).tolist())
    a = plan.assign[0]
    assert a[:3].tolist() == [-1, -1, -1] and a[3] == a[4] >= 0 and plan.sizes[0].tolist().count(2.0) == 1
    assert not mmtok.create_compressor("sparsevlm", recycle=False)(tokens, 8).merging
