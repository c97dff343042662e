"""Chapter 10: attention capture and the measures built on it."""
import matplotlib
import pytest
import torch

from hf_ref import tiny_hf_model
from qwen3_scratch.hf_port import from_transformers
from qwen3_scratch.viz import (attention_entropy, attention_explorer, capture_attention, group_contrast,
                               head_similarity, recording, sink_share, uniform_sink_share, widgets_available)

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def pair():
    hf = tiny_hf_model()
    ours = from_transformers(hf)
    return hf, ours


def test_captured_maps_equal_transformers_attentions(pair):
    hf, ours = pair
    ids = torch.randint(0, 256, (2, 11))
    maps = capture_attention(ours, ids)
    with torch.no_grad():
        ref = hf(ids, output_attentions=True).attentions  # tuple over layers of (B, H, T, T)
    assert sorted(maps) == list(range(len(ref)))
    for layer, probs in maps.items():
        assert probs.shape == (2, 4, 11, 11)
        torch.testing.assert_close(probs, ref[layer], atol=1e-5, rtol=0)


def test_capture_is_switched_off_and_does_not_change_logits(pair):
    _, ours = pair
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        before = ours(ids)
    maps = capture_attention(ours, ids, layers=[1])
    assert list(maps) == [1]
    assert all(not l.self_attn.record_probs and l.self_attn.last_probs is None for l in ours.layers)
    with pytest.raises(RuntimeError):
        with recording(ours, [0]):
            raise RuntimeError("boom")
    assert not ours.layers[0].self_attn.record_probs, "an exception must not leave recording on"
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), before, atol=1e-5, rtol=0)


def test_bad_layer_index_names_the_limit(pair):
    _, ours = pair
    with pytest.raises(ValueError, match=r"layers \[7\] out of range: the model has 3 layers"):
        capture_attention(ours, torch.zeros(1, 3, dtype=torch.long), layers=[0, 7])


def test_entropy_and_sink_on_maps_with_known_answers():
    n = 7
    uniform = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]
    onehot = torch.zeros(n, n)
    onehot[:, 0] = 1
    prev = torch.zeros(n, n)
    prev[0, 0] = 1
    prev[torch.arange(1, n), torch.arange(0, n - 1)] = 1  # each query looks at the previous token
    assert attention_entropy(uniform).item() == pytest.approx(1.0, abs=1e-6)
    assert attention_entropy(onehot).item() == pytest.approx(0.0, abs=1e-6)
    assert attention_entropy(prev).item() == pytest.approx(0.0, abs=1e-6)
    assert sink_share(onehot).item() == 1.0
    assert sink_share(prev).item() == pytest.approx(1 / (n - 1))
    assert sink_share(uniform).item() == pytest.approx(uniform_sink_share(n))
    # batched shapes: (L, H, T, S) -> (L, H)
    assert attention_entropy(torch.stack([uniform, onehot])[None]).shape == (1, 2)


def test_head_similarity_and_group_contrast():
    n = 6
    a = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]
    b = torch.zeros(n, n)
    b[:, 0] = 1
    heads = torch.stack([a, a, b, b])  # two groups of two identical heads
    sim = head_similarity(heads)
    torch.testing.assert_close(sim, sim.T)
    torch.testing.assert_close(sim.diagonal(), torch.ones(4))
    s = sim[0, 2].item()  # similarity of the two different maps
    assert 0 < s < 0.9
    assert group_contrast(heads, num_kv_heads=2) == pytest.approx(1 - s, abs=1e-6)  # groups alike
    # interleaved: inside each group the maps differ; across groups half the pairs are identical
    assert group_contrast(torch.stack([a, b, a, b]), num_kv_heads=2) == pytest.approx((s - 1) / 2, abs=1e-6)


def test_entropy_with_cached_keys():
    # 2 new queries after 3 cached tokens: they see 4 and 5 keys (S - T + 1 .. S), not 1 and 2
    T, S = 2, 5
    uniform = torch.zeros(T, S)
    uniform[0, :4], uniform[1, :] = 1 / 4, 1 / 5
    # only query 1 counts (query 0 is skipped, as without a cache); its entropy is log 5 -> normalized 1
    assert attention_entropy(uniform).item() == pytest.approx(1.0, abs=1e-6)
    assert attention_entropy(uniform, normalized=False).item() == pytest.approx(torch.tensor(5.0).log().item())


def test_explorer_falls_back_to_static_plot(pair, monkeypatch):
    _, ours = pair
    small_vocab = type("Tok", (), {"encode": staticmethod(lambda s: [ord(c) % 256 for c in s]),
                                   "decode": staticmethod(lambda ids: "".join(chr(i) for i in ids))})
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)  # no Jupyter server started us (as under nbval)
    assert not widgets_available()
    fig = attention_explorer(ours, small_vocab, "hello world")
    assert len(fig.axes) == 4  # one panel per head of the middle layer


def test_explorer_widgets_redraw_without_printing_the_tensor(pair):
    _, ours = pair
    small_vocab = type("Tok", (), {"encode": staticmethod(lambda s: [ord(c) % 256 for c in s]),
                                   "decode": staticmethod(lambda ids: "".join(chr(i) for i in ids))})
    explorer = attention_explorer(ours, small_vocab, "hello world", interactive=True)
    text, layer, head = explorer.widget.children[:3]
    assert text.value == "hello world" and text.layout.width, "the prompt box shows the whole default prompt"
    layer.value = 1  # moving a slider re-runs the callback
    assert explorer.widget.result is None, "a returned value would be printed under the heatmap on every update"


def test_load_for_viz_uses_a_cached_copy_on_any_device_then_the_trained_model(tmp_path, monkeypatch):
    """Real weights need only a local copy (chapter 8's cached_checkpoint), not a GPU."""
    from qwen3_scratch import viz
    from qwen3_scratch.weights import save_pretrained
    folder = save_pretrained(from_transformers(tiny_hf_model()), tmp_path / "ckpt")
    monkeypatch.setattr(viz, "cached_checkpoint", lambda repo: folder if repo == "Org/Tiny" else None)
    model, tok, what = viz.load_for_viz("Org/Tiny", device="cpu")
    assert what == "Org/Tiny (float32)" and model.config.num_hidden_layers == 3 and not model.training
    model, tok, what = viz.load_for_viz("Org/Missing", device="cpu")  # no cached copy: the shipped trained model
    assert what.startswith("tiny Shakespeare Qwen3 (trained") and model.config.vocab_size == tok.vocab_size == 4096
    monkeypatch.setattr(viz, "package_dir", lambda: tmp_path / "nowhere")
    model, tok, what = viz.load_for_viz("Org/Missing", device="cpu")
    assert what.startswith("random tiny Qwen3") and model.config.num_hidden_layers == 6
