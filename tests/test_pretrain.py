"""The demo's base (gptoss.train.pretrain): the compact-vocabulary loss is the full-vocabulary loss of the
model it writes back, the shipped file is the one its sha256 names and sits on the demo's checkpoint, a
file that is not is refused with the reason, and the caption copies the instruction's name token."""

import contextlib
import io
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TRAIN_CONFIG

from gptoss import harmony
from gptoss.load import load_model
from gptoss.synthetic import write_checkpoint
from gptoss.train import pretrain
from gptoss.train.data import collate, render_example
from gptoss.train.loss import next_token_loss
from gptoss.train.make_dataset import CAPTION, HELDOUT_ONLY, TRAIN_REASONING, base_rows


def test_compact_loss_is_the_full_vocabulary_loss_with_the_unused_rows_tied():
    torch.manual_seed(1)
    V, D, N = 50, 8, 12
    used = torch.tensor([0, 3, 7, 11, 20, 21, 33, 49])
    rows = torch.randn(len(used) + 1, D)  # the used tokens' rows, then the shared one
    full = rows[-1].expand(V, D).clone()
    full[used] = rows[:-1]
    hidden, target = torch.randn(N, D), torch.randint(0, len(used), (N,))
    expected = F.cross_entropy(F.linear(hidden, full), used[target])
    assert pretrain.compact_loss(hidden, rows, target, V - len(used)).item() == pytest.approx(expected.item(), rel=1e-6)
    # without the shared row's log(V - C) it is a different (smaller) loss: the term is what makes it exact
    assert pretrain.compact_loss(hidden, rows, target, 1).item() < expected.item() - 0.1


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = write_checkpoint(tmp_path_factory.mktemp("base"), TRAIN_CONFIG, "hf-mxfp4", seed=5)
    model = load_model(folder, dtype=torch.float32)
    packed = pretrain.pretrain(model, 3, log=lambda line: None)
    return folder, model, packed


def test_pretraining_writes_back_a_full_vocabulary_model_and_packs_what_changed(trained):
    folder, model, packed = trained
    fresh = load_model(folder, dtype=torch.float32)
    used = packed["vocab.used"].long()
    unused = torch.ones(model.config.vocab_size, dtype=torch.bool)
    unused[used] = False
    head = model.lm_head.weight
    assert (head[unused] == packed["vocab.head_rest"]).all()  # every unused row is the shared one
    assert (model.model.embed_tokens.weight[unused] == fresh.model.embed_tokens.weight[unused]).all()
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, fresh.model.layers[0].self_attn.q_proj.weight)
    pretrain.unpack(fresh, packed)
    ids, mask = collate([pretrain_example(i) for i in range(2)])
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))  # the packed file holds everything pre-training changed
        # and the full-vocabulary loss of the written-back model is the compact loss it was trained on
        full, count = next_token_loss(model, ids, mask)
        hidden = model.hidden(ids)[:, :-1][mask[:, 1:].bool()]
        to_compact = torch.full((model.config.vocab_size,), len(used), dtype=torch.long)
        to_compact[used] = torch.arange(len(used))
        rows = torch.cat([head[used], packed["vocab.head_rest"][None]])
        compact = pretrain.compact_loss(hidden, rows, to_compact[ids[:, 1:][mask[:, 1:].bool()]], int(unused.sum()))
    assert (full / count).item() == pytest.approx(compact.item(), rel=1e-5)


def pretrain_example(i):
    from gptoss.train.data import Example

    row = base_rows(n=2, seed=pretrain.RECIPE["rows_seed"])[i]
    return Example(*render_example(row, None, i), row["reasoning_language"], i)


def test_a_base_that_is_not_the_shipped_one_is_refused_with_the_reason(trained, tmp_path):
    folder, model, packed = trained
    path = tmp_path / "base.safetensors"
    assert "is absent" in pretrain.shipped_base(model, path)
    digest = pretrain.save(path, packed, pretrain.experts_fingerprint(model), 3)
    assert "a changed or damaged file" in pretrain.shipped_base(model, path, sha256="0" * 64)
    other = load_model(write_checkpoint(tmp_path / "other", TRAIN_CONFIG, "hf-mxfp4", seed=6), dtype=torch.float32)
    assert "another tiny checkpoint" in pretrain.shipped_base(other, path, sha256=digest)
    fresh = load_model(folder, dtype=torch.float32)
    assert pretrain.shipped_base(fresh, path, sha256=digest) is None
    ids = torch.randint(0, 1000, (1, 9))
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))


def test_the_shipped_base_is_its_sha256_and_sits_on_the_demos_checkpoint(tmp_path):
    assert pretrain.SHIPPED.exists(), f"{pretrain.SHIPPED} is missing: python -m gptoss.train.pretrain writes it"
    assert pretrain.file_sha256(pretrain.SHIPPED) == pretrain.SHIPPED_SHA256
    from gptoss.config import get_preset

    model = load_model(write_checkpoint(tmp_path / "tiny", get_preset("tiny"), "hf-mxfp4", seed=0), dtype=torch.float32)
    assert pretrain.shipped_base(model) is None


def test_the_shipped_base_records_the_recipe_it_was_made_with():
    from safetensors import safe_open

    with safe_open(str(pretrain.SHIPPED), "pt") as f:
        header = json.loads(f.metadata()["gptoss_base"])
    assert header["recipe"] == pretrain.RECIPE  # `python -m gptoss.train.pretrain` remakes this file


def test_the_same_base_is_written_to_the_same_bytes(trained, tmp_path):
    # the shipped file is checked by its sha256, so writing the same tensors must give the same bytes
    # every time (safetensors orders a metadata map of several keys differently from run to run)
    _, model, packed = trained
    fingerprint = pretrain.experts_fingerprint(model)
    digests = {pretrain.save(tmp_path / f"base{i}.safetensors", packed, fingerprint, 3) for i in range(8)}
    assert len(digests) == 1


def test_the_caption_names_the_language_with_the_instructions_own_token():
    # "reasoning language: Dutch" ends in the token " Dutch"; the caption "Language: Dutch. " holds that same
    # token, so following the instruction can be a copy (a caption "(Dutch)" is the tokens "(D" "utch")
    for language in TRAIN_REASONING + HELDOUT_ONLY:
        name = harmony.encode(f"reasoning language: {language}")[-1]
        caption = harmony.encode(CAPTION.format(language=language) + "x")
        assert harmony.decode([name]) == " " + language and name in caption, (language, caption)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "--steps must be at least 1"),
        (["--steps", "-3"], "--steps must be at least 1"),
        (["--steps", "abc"], "invalid int value"),
        (["--steps", "nan"], "invalid int value"),
        (["--steps"], "expected one argument"),
        (["--out", "/"], "give a file path in an existing folder"),
        (["--out", "/nonexistent-folder/base.safetensors"], "give a file path in an existing folder"),
    ],
)
def test_hostile_arguments_are_refused_in_one_line(argv, message):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit:
        pretrain.main(argv)
    assert exit.value.code == 2 and message in err.getvalue() and "Traceback" not in err.getvalue()
