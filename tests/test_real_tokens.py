"""Figure 4 (docs/PAPER_NOTES.md §4.8): the batched AR(1) fit against exact algebra and a per-window lstsq, the windows
and their shuffle, the config checks, and smoke runs of run_fig4 (wordllama) and of the hf: loader."""

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from icar.analysis.ar_fit import ar1_mse, ar1_mse_float32, conflicting_repeat, has_repeat
from icar.config import ConfigError
from icar.data.real_tokens import (EmbeddingSource, corpus_ids, cut_windows, load_embedding_source, paragraphs,
                                   shuffle_windows, subsample_windows, unit_rows)
from icar.claims.fig4 import fig4_numbers, run_fig4, to_fig4_config
from icar.orchestration.hydra_config import register_configs
from tests.conftest import CONF_DIR

TEXT = ("The whale swam on. Call me Ishmael. Some years ago, never mind how long precisely, having little or no "
        "money in my purse, and nothing particular to interest me on shore, I thought I would sail about a little "
        "and see the watery part of the world.\n\nIt is a way I have of driving off the spleen and regulating the "
        "circulation. Whenever I find myself growing grim about the mouth, I account it high time to get to sea.\n")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orthogonal(D: int, g: torch.Generator) -> torch.Tensor:
    Q, R = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))  # (D, D)


@pytest.mark.parametrize("D", [3, 8, 64])
def test_window_of_a_known_orthogonal_w_fits_exactly(D):
    """s_{t+1} = W s_t: the fitted map regenerates the window to round-off, also when D < T - 1."""
    g = gen(D)
    windows = []
    for _ in range(16):
        W = orthogonal(D, g)
        s = [torch.nn.functional.normalize(torch.randn(D, generator=g, dtype=torch.float64), dim=0)]
        for _ in range(4):
            s.append(W @ s[-1])
        windows.append(torch.stack(s))  # (T, D)
    assert ar1_mse(torch.stack(windows)).max() < 1e-20


def test_repeated_token_with_two_successors_is_not_exact():
    """ids a b a c d: a must map to b and to c, so no map fits; a b a b a (same successor) fits exactly."""
    table = unit_rows(torch.randn(4, 32, generator=gen(0), dtype=torch.float64))  # a, b, c, d
    ids = torch.tensor([[0, 1, 0, 2, 3], [0, 1, 0, 1, 0], [0, 1, 2, 3, 0]])
    mse = ar1_mse(table[ids])
    assert mse[0] > 1e-4
    assert mse[1] < 1e-20 and mse[2] < 1e-20  # the last token of a window is no input: its repeat is harmless
    assert has_repeat(ids).tolist() == [True, True, False]
    assert conflicting_repeat(ids).tolist() == [True, False, False]


def test_batched_fit_matches_per_window_lstsq():
    """Against torch.linalg.lstsq (gelsd: minimum-norm, rank-revealing) window by window, repeats included."""
    g = gen(1)
    table = unit_rows(torch.randn(6, 16, generator=g, dtype=torch.float64))
    ids = torch.randint(0, 6, (64, 5), generator=g)  # many repeats among 6 tokens
    s = table[ids]  # (64, 5, 16)
    expected = []
    for x in s:
        A = torch.linalg.lstsq(x[:-1], x[1:], driver="gelsd").solution  # X A = Y, W_hat = A^T
        s_hat = [x[0]]
        for _ in range(4):
            s_hat.append(A.T @ s_hat[-1])
        expected.append((torch.stack(s_hat) - x).pow(2).mean())
    expected = torch.stack(expected)
    torch.testing.assert_close(ar1_mse(s, chunk=7), expected, rtol=1e-9, atol=1e-24)
    assert ((expected > 1e-12) == conflicting_repeat(ids)).all()  # generic embeddings: inexact iff a clash


def test_float32_path_matches_the_float64_verdicts():
    """The authors' float32 lstsq: exact fits at round-off (far below 1e-12), clashes far above; threads restored."""
    g = gen(2)
    s = unit_rows(torch.randn(6, 32, generator=g), torch.float32)[torch.randint(0, 6, (40, 5), generator=g)]
    threads = torch.get_num_threads()
    mse32 = ar1_mse_float32(s, chunk=16)
    assert mse32.dtype == torch.float32 and mse32.shape == (40,) and torch.get_num_threads() == threads
    exact32, exact64 = mse32 <= 1e-12, ar1_mse(s.double()) <= 1e-12
    assert (exact32 == exact64).all() and 0 < exact32.sum() < 40
    assert mse32[exact32].max() < 1e-13 and mse32[~exact32].min() > 1e-6


def test_windows_subsample_and_shuffle():
    ids = torch.arange(103)
    windows = cut_windows(ids, 5)
    assert windows.shape == (20, 5) and windows[1].tolist() == [5, 6, 7, 8, 9]
    sub = subsample_windows(windows, 8, gen(0))
    assert sub.shape == (8, 5) and (sub[1:, 0] > sub[:-1, 0]).all()  # distinct windows, in corpus order
    assert subsample_windows(windows, 0, gen(0)) is windows
    shuffled = shuffle_windows(sub, gen(0))
    assert shuffled.shape == sub.shape and not torch.equal(shuffled, sub)
    assert torch.equal(shuffled.flatten().sort().values, sub.flatten().sort().values)  # the same multiset
    assert torch.equal(shuffled, shuffle_windows(sub, gen(0)))  # seeded


def test_paragraphs_drop_underlines_and_indentation():
    text = 'The "if" statement\n******************\n\n   if_stmt ::= "if"\n      expr\n\n\n'
    assert paragraphs(text) == ['The "if" statement', 'if_stmt ::= "if" expr']


def test_corpus_ids_checks_the_table():
    source = EmbeddingSource("toy", lambda texts: [[0, 1], [7]], torch.zeros(5, 3))
    with pytest.raises(ValueError, match="outside the embedding table"):
        corpus_ids(source, ["a", "b"])


@pytest.mark.parametrize("override, key", [({"T": 2}, "T must be >= 3"), ({"source": "gpt2"}, "source must be"),
                                           ({"text": "/no/such.txt"}, "text must be"),
                                           ({"max_windows": -1}, "max_windows"), ({"threshold": 0.0}, "threshold"),
                                           ({"logger": {"kind": "csv"}}, "logger.kind")])
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        to_fig4_config(override)


def test_unknown_source_names_the_choices():
    with pytest.raises(ValueError, match="hf:<model name or path>"):
        load_embedding_source("bert")


def test_run_fig4_smoke(tmp_path: Path):
    """conf/fig4.yaml composed as scripts/fig4.py does, on a small text, W&B offline: the record and figures."""
    corpus = tmp_path / "text.txt"
    corpus.write_text(TEXT * 3)
    run_dir = tmp_path / "run"
    register_configs()  # fig4_schema, as scripts/fig4.py does
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("fig4", overrides=[f"text={corpus}", "max_windows=40", f"run_dir={run_dir}",
                                         "logger.mode=offline"])
    n = run_fig4(cfg)
    numbers = n.to_json()
    record = json.loads((run_dir / "figure.json").read_text())
    assert record["figure"] == "fig4" and record["numbers"] == numbers and n.n_windows == 40
    assert record["scale"] == "cpu"  # a subset of the windows; max_windows=0 is the paper's scale
    for path in record["figures"]:
        assert Path(path).is_file()
    assert {Path(p).suffix for p in record["figures"]} == {".png", ".pdf"}
    assert (run_dir / "config.yaml").is_file() and (run_dir / "summary.json").is_file()
    assert any((run_dir / "wandb").glob("offline-run-*"))
    for key in ("fraction_exact_real", "fraction_exact_shuffled", "fraction_windows_with_repeat_real",
                "fraction_windows_with_repeat_shuffled", "fraction_exact_real_float32",
                "fraction_exact_shuffled_float32"):
        assert 0.0 <= numbers[key] <= 1.0
    assert numbers["median_mse_real_float32"] >= 0 and numbers["median_mse_shuffled"] >= 0
    assert numbers["source"] == "wordllama" and numbers["embedding_dim"] == 256 and numbers["vocab_size"] == 32000
    assert numbers["corpus_tokens"] >= 5 * 40
    assert numbers["n_inexact_real"] == round((1 - numbers["fraction_exact_real"]) * 40)


def test_hf_source_loads_a_tiny_gpt2(tmp_path: Path, monkeypatch):
    """hf:<local path>: a random one-layer GPT-2 and a word-level tokenizer saved to tmp_path, no network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]"]))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]") \
        .save_pretrained(tmp_path)
    config = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_embd=16, n_layer=1, n_head=2, n_positions=16)
    transformers.GPT2Model(config).save_pretrained(tmp_path)

    source = load_embedding_source(f"hf:{tmp_path}")
    assert source.table.shape == (tok.get_vocab_size(), 16) and source.table.dtype == torch.float64
    ids = corpus_ids(source, ["Call me Ishmael.", "zebra whale"])  # zebra: [UNK], dropped as a special token
    assert ids.tolist() == [tok.token_to_id(w) for w in ("Call", "me", "Ishmael", ".", "whale")]
    corpus = tmp_path / "text.txt"
    corpus.write_text(TEXT)
    n, mse = fig4_numbers(to_fig4_config({"source": f"hf:{tmp_path}", "text": str(corpus), "max_windows": 0}))
    assert n.embedding_dim == 16 and mse["float64"]["real"].shape == (n.n_windows,)
    assert not math.isnan(n.sets["real"].fraction_exact) and mse["float32"]["real"].dtype == torch.float32
    n, mse = fig4_numbers(to_fig4_config({"source": f"hf:{tmp_path}", "text": str(corpus), "max_windows": 0,
                                           "float32_check": False}))
    assert set(mse) == {"float64"} and n.float32 is None and "fraction_exact_real_float32" not in n.to_json()
