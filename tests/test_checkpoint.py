"""Loading upstream and our own checkpoints: strict, safe, and with errors that say what to do."""
import argparse
import logging
import math
import os
import stat

import pytest
import torch

from sit_fast.checkpoint import (
    CheckpointError, infer_config, load_checkpoint, load_into_model, read_checkpoint, training_transport,
)
from sit_fast.models import SiT, SiT_models
from tests.test_models import expected_keys


def upstream_state_dict(depth, hidden, patch, learn_sigma, num_classes=10, input_size=16, in_ch=4):
    """A checkpoint in upstream's layout, built from the key list alone (not from our model)."""
    keys = expected_keys(depth, hidden, patch, in_ch, learn_sigma, num_classes, input_size)
    return {k: torch.randn(shape) for k, shape in keys.items()}


def model_for(depth, hidden, patch, learn_sigma, num_classes=10, input_size=16, heads=4, in_ch=4):
    return SiT(input_size=input_size, patch_size=patch, hidden_size=hidden, depth=depth, num_heads=heads,
               num_classes=num_classes, learn_sigma=learn_sigma, in_channels=in_ch)


CONFIGS = [(2, 32, 2), (3, 48, 4), (1, 64, 8)]


@pytest.mark.parametrize("depth,hidden,patch", CONFIGS)
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_upstream_layout_loads_strict_and_round_trips(tmp_path, depth, hidden, patch, learn_sigma):
    sd = upstream_state_dict(depth, hidden, patch, learn_sigma)
    path = tmp_path / "upstream.pt"
    torch.save(sd, path)
    model = model_for(depth, hidden, patch, learn_sigma)
    info = load_checkpoint(model, path)
    assert info["weights"] == "raw" and not info["label_table_reinitialised"]
    out = model.state_dict()
    assert out.keys() == sd.keys()
    for k in sd:
        assert torch.equal(out[k], sd[k]), k
    cfg = infer_config(sd)
    assert cfg == dict(input_size=16, patch_size=patch, in_channels=4, hidden_size=hidden, depth=depth,
                       learn_sigma=learn_sigma, num_classes=10)


def test_infer_config_reads_a_wrappers_state_dict_and_names_a_training_checkpoints_entry():
    """What load_into_model takes, infer_config reads alike: a DDP or compiled model's keys ("module.",
    "_orig_mod."); a whole training checkpoint is named as one, with the entry to pass; a path or a list is
    a TypeError naming what to call."""
    sd = upstream_state_dict(2, 32, 2, True)
    wrapped = {f"module._orig_mod.{k}": v for k, v in sd.items()}
    assert infer_config(wrapped) == infer_config(sd)
    with pytest.raises(CheckpointError, match=r"^state_dict is a training checkpoint \(entries model, ema\), not a "
                                              r"state_dict: pass its \['ema'\] entry"):
        infer_config({"model": sd, "ema": sd})
    with pytest.raises(TypeError, match=r"^infer_config takes a state_dict, got the path 'w\.pt': a file loads with "
                                        r"read_checkpoint\(path\)\[0\]$"):
        infer_config("w.pt")
    with pytest.raises(TypeError, match=r"^infer_config takes a state_dict \(a dict of tensors\), got a list$"):
        infer_config([sd])


def test_infer_config_counts_no_blocks_as_depth_0():
    sd = {k: v for k, v in upstream_state_dict(1, 32, 2, True).items() if not k.startswith("blocks.")}
    assert infer_config(sd)["depth"] == 0
    model = model_for(0, 32, 2, True)
    load_into_model(model, sd)


def test_train_checkpoint_prefers_ema_and_strips_wrappers(tmp_path):
    model = model_for(2, 32, 2, True)
    raw = {"module." + k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    ema = {"_orig_mod." + k: torch.ones_like(v) for k, v in model.state_dict().items()}
    path = tmp_path / "0000100.pt"
    torch.save({"model": raw, "ema": ema, "opt": {}, "args": {"model": "SiT-T/2"}, "step": 100}, path)
    info = load_checkpoint(model, path)
    assert info["weights"] == "ema" and info["step"] == 100 and info["args"] == {"model": "SiT-T/2"}
    assert all(torch.all(v == 1) for v in model.state_dict().values())
    load_checkpoint(model, path, prefer="model")
    assert all(torch.all(v == 0) for v in model.state_dict().values())


def test_safetensors(tmp_path):
    from safetensors.torch import save_file

    sd = upstream_state_dict(2, 32, 2, False)
    save_file(sd, str(tmp_path / "w.safetensors"))
    model = model_for(2, 32, 2, False)
    info = load_checkpoint(model, tmp_path / "w.safetensors")
    assert info["format"] == "safetensors"
    assert torch.equal(model.state_dict()["pos_embed"], sd["pos_embed"])


def test_class_count_mismatch_reinitialises_label_table(tmp_path, caplog):
    sd = upstream_state_dict(2, 32, 2, True, num_classes=1000)
    torch.save(sd, tmp_path / "c.pt")
    model = model_for(2, 32, 2, True, num_classes=10)
    with torch.no_grad():  # a table trained or loaded before: it is re-initialised, not kept
        model.y_embedder.embedding_table.weight.fill_(3.0)
    with caplog.at_level(logging.WARNING, logger="sit_fast"):
        info = load_checkpoint(model, tmp_path / "c.pt")
    assert info["label_table_reinitialised"]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert "1001 rows" in messages[0] and "11" in messages[0] and "re-initialised" in messages[0]
    assert "null label of guidance, kept" in messages[0] and "trained without class dropout" not in messages[0]
    table = model.y_embedder.embedding_table.weight.detach()
    classes = table[:-1]  # redrawn as at initialisation; the null row, the last, is the checkpoint's
    assert table.shape == (11, 32) and abs(classes.mean().item()) < 0.01 and 0.015 < classes.std().item() < 0.025
    assert torch.equal(table[-1], sd["y_embedder.embedding_table.weight"][-1])
    assert torch.equal(model.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])


def test_the_null_row_is_kept_for_an_unconditional_fine_tune_and_an_empty_table_loads(tmp_path, caplog):
    """num_classes=0 with label dropout: the table is the null row alone, the checkpoint's last row (the
    case where keeping it matters most); a checkpoint with no label rows at all has none to keep."""
    guided = SiT_models["SiT-T/2"](input_size=8, num_classes=10)
    torch.nn.init.normal_(guided.y_embedder.embedding_table.weight)
    unconditional = SiT_models["SiT-T/2"](input_size=8, num_classes=0)
    with caplog.at_level(logging.WARNING, logger="sit_fast"):
        assert load_into_model(unconditional, guided.state_dict())["label_table_reinitialised"]
    assert "kept" in caplog.records[-1].getMessage()
    assert torch.equal(unconditional.y_embedder.embedding_table.weight, guided.y_embedder.embedding_table.weight[-1:])
    empty = SiT_models["SiT-T/2"](input_size=8, num_classes=0, class_dropout_prob=0).state_dict()
    assert empty["y_embedder.embedding_table.weight"].shape[0] == 0
    with caplog.at_level(logging.WARNING, logger="sit_fast"):
        assert load_into_model(guided, empty)["label_table_reinitialised"]
    assert "kept" not in caplog.records[-1].getMessage()
    assert 0.01 < guided.y_embedder.embedding_table.weight.std().item() < 0.03  # all 11 rows redrawn


def test_a_label_table_redrawn_on_load_leaves_the_callers_generator_where_it_was(tmp_path):
    torch.save(upstream_state_dict(2, 32, 2, True, num_classes=1000), tmp_path / "c.pt")
    model = model_for(2, 32, 2, True, num_classes=10)
    torch.manual_seed(5)
    load_checkpoint(model, tmp_path / "c.pt")
    after_load = torch.rand(4)
    torch.manual_seed(5)
    assert torch.equal(after_load, torch.rand(4))


@pytest.mark.parametrize("shape", [(11, 16), (11,), (11, 32, 1)])
def test_a_label_table_of_another_shape_than_rows_is_a_mismatch(shape):
    """Only a table of other rows, as wide as the model's, is another class count; any other shape of
    it is refused as every other mismatch is."""
    sd = upstream_state_dict(2, 32, 2, True, num_classes=10)
    sd["y_embedder.embedding_table.weight"] = torch.randn(shape)
    with pytest.raises(CheckpointError, match=r"shape mismatch: y_embedder.embedding_table.weight"):
        load_into_model(model_for(2, 32, 2, True, num_classes=10), sd)


@pytest.mark.parametrize("change,needle", [
    (lambda sd: sd.update({"blocks.0.extra.weight": torch.zeros(1)}), "unexpected keys blocks.0.extra.weight"),
    (lambda sd: sd.pop("blocks.1.attn.proj.bias"), "missing keys blocks.1.attn.proj.bias"),
], ids=["unexpected", "missing"])
def test_another_class_count_beside_another_key_is_a_mismatch(change, needle):
    """The label table is redrawn only when it is the one difference; a key too many or too few as well
    is refused as every other mismatch is, naming the key."""
    sd = upstream_state_dict(2, 32, 2, True, num_classes=1000)
    change(sd)
    with pytest.raises(CheckpointError, match=needle):
        load_into_model(model_for(2, 32, 2, True, num_classes=10), sd)


def test_non_tensor_values_given_to_load_into_model_are_named():
    sd = upstream_state_dict(1, 32, 2, True)
    sd["pos_embed"] = sd["pos_embed"].numpy()
    with pytest.raises(CheckpointError, match="checkpoint: entries that are not tensors: pos_embed"):
        load_into_model(model_for(1, 32, 2, True), sd)


WRONG_SIZE = "wrong model or image size (--model, --image-size)?"


@pytest.mark.parametrize("change,expect,fix", [
    (dict(learn_sigma=False), "final_layer.linear.weight", "build the model with learn_sigma=True"),
    (dict(in_ch=3), "x_embedder.proj.weight (32, 4, 2, 2) vs model (32, 3, 2, 2)",
     "build the model with in_channels=4"),
    (dict(depth=3), "missing keys blocks.2", WRONG_SIZE),
    (dict(patch=4), "x_embedder.proj.weight", WRONG_SIZE),
    (dict(input_size=32), "pos_embed", WRONG_SIZE),
    (dict(input_size=32, learn_sigma=False), "pos_embed", WRONG_SIZE),
])
def test_other_mismatches_name_keys_and_fix(tmp_path, change, expect, fix):
    """The fix named is the one that applies: learn_sigma or the channels are no --model or --image-size."""
    torch.save(upstream_state_dict(2, 32, 2, True), tmp_path / "m.pt")
    args = dict(depth=2, hidden=32, patch=2, learn_sigma=True)
    args.update(change)
    model = model_for(**args)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(model, tmp_path / "m.pt")
    message = str(err.value)
    assert "\n" not in message
    assert expect in message and message.endswith(fix + ")"), message
    if fix != WRONG_SIZE:
        assert "--model" not in message and "--image-size" not in message, message


def test_a_mismatch_of_channels_and_classes_names_both_constructor_arguments(tmp_path):
    """A pixel-space digits checkpoint (1 channel, 10 classes) and a model of the defaults (4 channels, 1000
    classes): the fix names num_classes too, which would otherwise load with a re-initialised label table."""
    torch.save(SiT_models["SiT-T/4"](input_size=8, in_channels=1, num_classes=10).state_dict(), tmp_path / "t.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(SiT_models["SiT-T/4"](input_size=8), tmp_path / "t.pt")
    assert str(err.value).endswith("build the model with in_channels=1, num_classes=10)"), str(err.value)
    with pytest.raises(CheckpointError) as err:  # the same classes: the channels alone
        load_checkpoint(SiT_models["SiT-T/4"](input_size=8, num_classes=10), tmp_path / "t.pt")
    assert str(err.value).endswith("build the model with in_channels=1)"), str(err.value)
    load_checkpoint(SiT_models["SiT-T/4"](input_size=8, in_channels=1, num_classes=10), tmp_path / "t.pt")
    # a model without the null row (class_dropout_prob=0) of the same 10 classes: its table is not another one
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(SiT_models["SiT-T/4"](input_size=8, num_classes=10, class_dropout_prob=0), tmp_path / "t.pt")
    assert str(err.value).endswith("build the model with in_channels=1)"), str(err.value)


def test_mismatch_names_the_registry_model_the_checkpoint_is(tmp_path):
    torch.save(SiT_models["SiT-T/4"](input_size=8).state_dict(), tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match=r"the checkpoint looks like SiT-T/4: depth 4, hidden 128, patch 4, "
                                              r"input size 8 \(8px images in pixel space, 64px through an 8x VAE\)"):
        load_checkpoint(SiT_models["SiT-S/4"](input_size=8), tmp_path / "t.pt")


def test_corrupt_and_missing_files(tmp_path):
    torch.save(upstream_state_dict(1, 32, 2, True), tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read .*cut.pt"):
        read_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("content", [b"hello\n", b"abc", b"", b"\x80\x02}q\x00."[:3]])
def test_foreign_files_are_one_line_errors(tmp_path, content):
    """Text, short or empty files make torch.load raise KeyError, IndexError, EOFError...: all one line."""
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"cannot read .*x\.pt: .*not a checkpoint") as err:
        read_checkpoint(path)
    assert "\n" not in str(err.value)


def test_a_device_or_a_named_pipe_is_named_as_no_regular_file(tmp_path):
    """/dev/null was "checkpoint not found", and a named pipe the same (it is there, and its read would
    wait for a writer): both are said to be no regular file; a path that is not there is not found."""
    os.mkfifo(tmp_path / "pipe.pt")
    for path in (os.devnull, tmp_path / "pipe.pt"):
        with pytest.raises(CheckpointError) as err:
            read_checkpoint(path)
        assert str(err.value) == (f"{path} is not a regular file (a device, a named pipe or a socket): pass a "
                                  f"checkpoint file")
    with pytest.raises(CheckpointError, match=r"^checkpoint not found: .*gone\.pt$"):
        read_checkpoint(tmp_path / "gone.pt")


def test_a_folder_is_named_as_one_with_its_newest_checkpoint(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    for step in (1000, 2000):
        torch.save(upstream_state_dict(1, 32, 2, True), tmp_path / "run" / "checkpoints" / f"{step:07d}.pt")
    with pytest.raises(CheckpointError,
                       match=r"run is a folder: pass a checkpoint file \(the newest here: .*0002000\.pt\)"):
        read_checkpoint(tmp_path / "run")
    # newest by time written, whatever the names; safetensors files count too
    (tmp_path / "export").mkdir()
    for i, name in enumerate(("ema.safetensors", "a.pt")):
        (tmp_path / "export" / name).write_bytes(b"")
        os.utime(tmp_path / "export" / name, (1e9 + i, 1e9 + (1 - i)))
    with pytest.raises(CheckpointError, match=r"the newest here: .*ema\.safetensors\)"):
        read_checkpoint(tmp_path / "export")
    # a latent cache's folder: its shards are no checkpoints
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "shard-00000.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"cache is a folder of latent-cache shards .*: pass a checkpoint file "
                                              r"\(train.py reads the cache with --latent-cache .*cache\)$"):
        read_checkpoint(tmp_path / "cache")


def test_upstream_training_checkpoint_with_namespace_args_loads(tmp_path):
    """Upstream train.py saves {"model", "ema", "opt", "args": argparse.Namespace}."""
    sd = upstream_state_dict(1, 32, 2, True)
    args = argparse.Namespace(model="SiT-XL/2", image_size=256, num_classes=10)
    torch.save({"model": sd, "ema": sd, "opt": {"state": {}, "param_groups": []}, "args": args}, tmp_path / "u.pt")
    state_dict, info = read_checkpoint(tmp_path / "u.pt")
    assert info["weights"] == "ema" and info["args"] == {"model": "SiT-XL/2", "image_size": 256, "num_classes": 10}
    assert state_dict.keys() == sd.keys()


def test_the_api_names_the_function_for_what_it_was_given(tmp_path):
    """A whole training checkpoint, a path or a state_dict handed to the wrong function: the error
    names the right one (not a list of missing keys, nor Python's own TypeError)."""
    sd = upstream_state_dict(1, 32, 2, True)
    model = model_for(1, 32, 2, True)
    training = {"model": sd, "ema": sd, "opt": {}, "args": argparse.Namespace(model="SiT-XL/2")}
    with pytest.raises(CheckpointError, match=r"^ckpt\.pt is a training checkpoint \(entries model, ema, opt, "
                                              r"args\), not a state_dict: pass its \['ema'\] entry, or load the "
                                              r"file with load_checkpoint / read_checkpoint"):
        load_into_model(model, training, source="ckpt.pt")
    load_into_model(model, training["ema"])
    with pytest.raises(TypeError, match=r"got the path '.*x\.pt': a file loads with load_checkpoint\(model, path\)"):
        load_into_model(model, str(tmp_path / "x.pt"))
    with pytest.raises(TypeError, match=r"^load_checkpoint takes the path .*, got a dict; a state_dict in memory "
                                        r"loads with load_into_model"):
        load_checkpoint(model, sd)


def test_the_release_by_name_is_read_as_upstreams_find_model_reads_it(tmp_path, monkeypatch):
    """read_checkpoint / load_checkpoint("SiT-XL-2-256x256.pt") with no such file here: the release,
    from ./pretrained_models (a tiny stand-in here), as the command lines take it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SIT_FAST_CACHE", str(tmp_path / "cache"))
    sd = upstream_state_dict(1, 32, 2, True)
    (tmp_path / "pretrained_models").mkdir()
    torch.save(sd, tmp_path / "pretrained_models" / "SiT-XL-2-256x256.pt")
    state_dict, info = read_checkpoint("SiT-XL-2-256x256.pt")
    assert info["weights"] == "raw" and all(torch.equal(state_dict[k], sd[k]) for k in sd)
    load_checkpoint(model_for(1, 32, 2, True), "SiT-XL-2-256x256.pt")
    with pytest.raises(CheckpointError, match="checkpoint not found: SiT-XL-2-512x512"):
        read_checkpoint("SiT-XL-2-512x512")  # not a release name: a path like any other


def test_uppercase_safetensors_suffix(tmp_path):
    from safetensors.torch import save_file

    sd = upstream_state_dict(1, 32, 2, True)
    save_file(sd, str(tmp_path / "W.SAFETENSORS"))
    state_dict, info = read_checkpoint(tmp_path / "W.SAFETENSORS")
    assert info["format"] == "safetensors" and state_dict.keys() == sd.keys()


class _RunsShell:
    def __reduce__(self):
        return (os.system, ("echo this would have run",))


@pytest.mark.parametrize("content,needle", [
    ({"model": [1, 2]}, "'model' entry is a list, not a state_dict"),
    ({1: torch.zeros(1)}, "keys that are not parameter names"),
    ({"x": _RunsShell()}, "refused to read"),
])
def test_malformed_checkpoints_are_one_line_errors(tmp_path, capsys, content, needle):
    torch.save(content, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=needle) as err:
        read_checkpoint(tmp_path / "m.pt")
    assert "\n" not in str(err.value) and "weights_only=False will likely succeed" not in str(err.value)
    assert "would have run" not in capsys.readouterr().out


def test_a_missing_ema_entry_falls_back_to_the_model_weights(tmp_path):
    sd = upstream_state_dict(1, 32, 2, True)
    torch.save({"ema": None, "model": sd, "step": "seven"}, tmp_path / "c.pt")
    state_dict, info = read_checkpoint(tmp_path / "c.pt")
    assert info["weights"] == "model" and info["step"] is None and state_dict.keys() == sd.keys()


def test_raw_weights_asked_of_an_ema_only_checkpoint_say_to_drop_the_flag(tmp_path):
    torch.save({"ema": upstream_state_dict(1, 32, 2, True), "step": 7}, tmp_path / "e.pt")
    with pytest.raises(CheckpointError, match=r"has no 'model' entry \(keys: ema, step\) \(it holds EMA weights alone: "
                                              r"take those: prefer='ema', sample.py without --use-raw, or "
                                              r"export's --weights ema\)"):
        read_checkpoint(tmp_path / "e.pt", prefer="model")
    assert read_checkpoint(tmp_path / "e.pt")[1]["weights"] == "ema"


def test_safetensors_holding_one_tensor_named_model_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"model": torch.zeros(2)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointError, match="'model' entry is a Tensor, not a state_dict"):
        read_checkpoint(tmp_path / "m.safetensors")


def test_a_truncated_or_foreign_safetensors_file_is_one_line_naming_it(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "cut.safetensors"
    save_file({"pos_embed": torch.zeros(8)}, str(path))
    path.write_bytes(path.read_bytes()[:-8])
    (tmp_path / "text.safetensors").write_text("not weights")
    for name in ("cut.safetensors", "text.safetensors"):
        with pytest.raises(CheckpointError) as info:
            read_checkpoint(tmp_path / name)
        message = str(info.value)
        assert message.startswith(f"cannot read {tmp_path / name}: ") and "\n" not in message, message
        assert message.endswith(" (corrupt or not a safetensors file)"), message


def test_safetensors_transport_metadata_that_is_not_json_counts_as_not_recorded(tmp_path):
    from safetensors.torch import save_file

    sd = upstream_state_dict(2, 32, 2, False)
    for transport, recorded in (('{"path_type": "VP", "prediction": "noise"}', {"path_type": "VP",
                                                                             "prediction": "noise"}),
                                ('{"path_type": ', None)):
        save_file(sd, str(tmp_path / "w.safetensors"), metadata={"format": "pt", "transport": transport})
        state_dict, info = read_checkpoint(tmp_path / "w.safetensors")
        assert info["args"] == recorded and state_dict.keys() == sd.keys()


class _RunsCode:
    def __reduce__(self):
        return (print, ("this would have run",))


def test_checkpoint_cannot_run_code(tmp_path, capsys):
    torch.save({"model": {"w": torch.zeros(1)}, "evil": _RunsCode()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused to read .*it pickles (builtins\\.)?print, which") as err:
        read_checkpoint(tmp_path / "evil.pt")
    assert "\x1b" not in str(err.value) and "\n" not in str(err.value)
    assert "this would have run" not in capsys.readouterr().out


def test_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a state_dict"):
        read_checkpoint(tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a SiT state_dict"):
        infer_config({"w": torch.zeros(1)})


def test_load_into_model_accepts_exact_state_dict():
    model = model_for(2, 32, 2, True)
    other = model_for(2, 32, 2, True)
    assert load_into_model(other, model.state_dict()) == {"label_table_reinitialised": False}


def _wrapped(model, wrap: str) -> torch.nn.Module:
    if wrap in ("data_parallel", "both"):
        model = torch.nn.DataParallel(model)
    if wrap in ("compile", "both"):
        model = torch.compile(model)
    return model


@pytest.mark.parametrize("wrap", ["compile", "data_parallel", "both"])
def test_load_into_model_loads_through_wrappers(wrap):
    source, target = model_for(2, 32, 2, True), model_for(2, 32, 2, True)
    load_into_model(_wrapped(target, wrap), source.state_dict())
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name


@pytest.mark.parametrize("wrap", ["compile", "data_parallel", "both"])
def test_load_into_model_takes_a_wrapped_models_state_dict(wrap):
    """A wrapper's state_dict (keys "_orig_mod." / "module." ...) loads as read_checkpoint's would."""
    source, target = model_for(2, 32, 2, True), model_for(2, 32, 2, True)
    wrapped = _wrapped(source, wrap)
    assert all(k.startswith(("module.", "_orig_mod.")) for k in wrapped.state_dict())
    load_into_model(target, wrapped.state_dict())
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name


def test_an_averaged_models_state_dict_loads_as_its_model(tmp_path):
    """torch.optim.swa_utils.AveragedModel (an EMA kept that way): "module." keys and its "n_averaged"."""
    source, target = model_for(2, 32, 2, True), model_for(2, 32, 2, True)
    averaged = torch.optim.swa_utils.AveragedModel(source)
    assert "n_averaged" in averaged.state_dict()
    load_into_model(target, averaged.state_dict())
    torch.save({"ema": averaged.state_dict()}, tmp_path / "ema.pt")
    assert read_checkpoint(str(tmp_path / "ema.pt"))[0].keys() == source.state_dict().keys()
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name
    with pytest.raises(CheckpointError, match="unexpected keys n_averaged"):  # not with a model's own keys
        load_into_model(target, {**source.state_dict(), "n_averaged": torch.tensor(1)})


def test_load_into_model_loads_into_an_averaged_models_copy():
    """An AveragedModel holds its own copy of the model: that copy takes the weights, its count stays."""
    source, target = model_for(2, 32, 2, True), model_for(2, 32, 2, True)
    ema = torch.optim.swa_utils.AveragedModel(target, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
    ema.n_averaged.fill_(3)
    load_into_model(torch.compile(ema), source.state_dict())
    for name, value in source.state_dict().items():
        assert torch.equal(ema.module.state_dict()[name], value), name
    assert ema.n_averaged.item() == 3


# ----------------------------------------------------------------------------- python -m sit_fast.export

def test_export_writes_one_set_of_weights_that_loads_everywhere(tmp_path, capsys):
    from sit_fast import export
    from sample import checkpoint_latent_space

    model = SiT_models["SiT-T/2"](input_size=8, in_channels=3, num_classes=10, learn_sigma=True)
    raw = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    ema = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    config = {"model": "SiT-T/2", "input_size": 8, "in_channels": 3, "num_classes": 10, "learn_sigma": True,
              "latent_space": "pixels"}
    ckpt = tmp_path / "0000100.pt"
    torch.save({"model": raw, "ema": ema, "opt": {"state": {}}, "args": {}, "step": 100, "model_config": config},
               ckpt)

    # .pt: a raw state_dict (upstream's release format) of the EMA weights, nothing else
    found = export.main([str(ckpt), "--out", str(tmp_path / "ema.pt")])
    plain = torch.load(tmp_path / "ema.pt", weights_only=True)
    assert plain.keys() == ema.keys() and all(torch.equal(plain[k], ema[k]) for k in ema)
    assert found["weights"] == "raw" and found["model_config"] is None
    assert found["model"] == "SiT-T/2" and found["config"]["learn_sigma"]
    printed = capsys.readouterr().out
    assert "ema weights, step 100" in printed and "ema.pt: pickle file" in printed and "a plain state_dict" in printed
    assert "not recorded (sample with --vae as trained)" in printed
    assert printed.endswith(f"note: {tmp_path / 'ema.pt'} is a plain state_dict and records no latent space; the "
                            f"model was trained with --vae none: pass those to sample.py (or export to .safetensors, "
                            f"which keeps them)\n"), printed  # sample.py would decode it with its default VAE

    # .safetensors in bf16 from the raw weights: the model_config travels as metadata
    export.main([str(ckpt), "--out", str(tmp_path / "w.safetensors"), "--weights", "model", "--dtype", "bf16"])
    state_dict, info = read_checkpoint(tmp_path / "w.safetensors")
    assert info["format"] == "safetensors" and state_dict["pos_embed"].dtype == torch.float32
    assert all(torch.equal(state_dict[k], raw[k].bfloat16()) for k in raw if k != "pos_embed")
    assert torch.equal(state_dict["pos_embed"], raw["pos_embed"])
    assert checkpoint_latent_space(str(tmp_path / "w.safetensors")) == "pixels"
    assert "w.safetensors: safetensors file" in capsys.readouterr().out.split("\n", 4)[4]
    found = export.describe(str(tmp_path / "w.safetensors"))
    assert (found["weights"], found["step"], found["dtypes"]) == ("model", 100, ["bfloat16", "float32"])
    assert found["parameters"] == sum(p.numel() for p in model.parameters())  # as upstream counts: pos_embed too
    assert checkpoint_latent_space(str(ckpt)) == "pixels" and checkpoint_latent_space(str(tmp_path / "ema.pt")) is None
    load_checkpoint(model, tmp_path / "w.safetensors")
    # from one .safetensors to another: which weights, of which step and in which space, carry over
    again = export.main([str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "again.safetensors")])
    assert (again["weights"], again["step"], again["model_config"]) == ("model", 100, config)


def test_export_reads_upstreams_release_by_name(tmp_path, monkeypatch, capsys):
    """As load_checkpoint and sample.py take it: SiT-XL-2-256x256.pt, not a file here, is the release
    found in ./pretrained_models or the cache (a tiny stand-in here)."""
    from sit_fast import export

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SIT_FAST_CACHE", str(tmp_path / "cache"))
    os.makedirs(tmp_path / "cache")
    sd = upstream_state_dict(1, 32, 2, True)
    torch.save(sd, tmp_path / "cache" / "SiT-XL-2-256x256.pt")
    found = export.main(["SiT-XL-2-256x256.pt", "--out", "w.safetensors"])
    assert found["config"]["depth"] == 1 and str(tmp_path / "cache" / "SiT-XL-2-256x256.pt") in capsys.readouterr().out
    state_dict, _ = read_checkpoint(tmp_path / "w.safetensors")
    assert all(torch.equal(state_dict[k], sd[k]) for k in sd)


def test_export_of_a_release_it_cannot_download_names_its_own_way_in(tmp_path, monkeypatch, capsys):
    """Offline, the release by name said to pass --ckpt PATH, a flag export does not have."""
    import urllib.error
    import urllib.request

    from sit_fast import export

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SIT_FAST_CACHE", str(tmp_path / "cache"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(SystemExit):
        export.main(["SiT-XL-2-256x256.pt", "--out", "w.safetensors"])
    err = capsys.readouterr().err
    assert err.startswith("error: cannot download the released checkpoint SiT-XL-2-256x256.pt (no network)") and \
        err.endswith("or pass a local checkpoint's path instead (python -m sit_fast.export PATH)\n"), err


@pytest.mark.parametrize("out,message", [
    ("w.bin", "extensions"), ("0000100.pt", "being read"), ("link.pt", "being read"), ("folder.pt", "is a folder"),
    ("old.pt", "exists: pass --force"), ("file.txt/w.pt", "cannot create"),
])
def test_export_refuses_bad_outputs_in_one_line(tmp_path, capsys, out, message):
    from sit_fast import export

    ckpt = tmp_path / "0000100.pt"
    torch.save(model_for(1, 32, 2, False).state_dict(), ckpt)
    os.symlink(ckpt, tmp_path / "link.pt")
    (tmp_path / "folder.pt").mkdir()
    (tmp_path / "old.pt").write_bytes(b"kept")
    (tmp_path / "file.txt").write_text("a file, not a folder")
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(ckpt), "--out", str(tmp_path / out)])
    assert exit_info.value.code == 2
    printed, err = capsys.readouterr()
    assert printed == ""  # refused before the checkpoint (gigabytes, for SiT-XL/2) is read and described
    err = err.strip()
    assert err.startswith("error: --out") and message in err and "\n" not in err
    assert (tmp_path / "old.pt").read_bytes() == b"kept" and ckpt.stat().st_size > 1000


def test_export_that_cannot_read_its_checkpoint_leaves_no_folder_made_for_out(tmp_path, capsys):
    from sit_fast import export

    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n not a checkpoint")
    (tmp_path / "kept").mkdir()
    for out in (tmp_path / "new" / "sub" / "w.pt", tmp_path / "kept" / "sub" / "w.pt"):
        with pytest.raises(SystemExit) as exit_info:
            export.main([str(tmp_path / "image.png"), "--out", str(out)])
        assert exit_info.value.code == 2 and capsys.readouterr().err.startswith("error: cannot read ")
    assert sorted(os.listdir(tmp_path)) == ["image.png", "kept"] and not os.listdir(tmp_path / "kept")


def test_export_force_replaces_and_options_without_out_are_refused(tmp_path, capsys):
    from sit_fast import export

    model = model_for(1, 32, 2, False)
    ckpt = tmp_path / "0000100.pt"
    torch.save({"model": model.state_dict(), "opt": {}, "args": {}, "step": 100}, ckpt)  # no EMA entry
    out = tmp_path / "W.SAFETENSORS"
    out.write_bytes(b"old")
    found = export.main([str(ckpt), "--out", str(out), "--force", "--dtype", "fp16"])
    assert found["format"] == "safetensors" and found["weights"] == "model" and "float16" in found["dtypes"]
    assert "note: it has no EMA weights; these are its model weights" in capsys.readouterr().out
    export.main([str(out), "--out", str(tmp_path / "again.pt"), "--weights", "ema"])
    assert "note: it holds one set of weights (model); --weights ema does not apply" in capsys.readouterr().out
    export.main([str(out), "--out", str(tmp_path / "again2.pt")])  # the default, not asked for: no note
    assert "note:" not in capsys.readouterr().out
    export.main([str(out), "--weights", "ema"])  # described only: the same note under the summary
    note = "note: it holds one set of weights (model); --weights ema does not apply"
    assert capsys.readouterr().out.endswith(f"\n{note}\n")
    with pytest.raises(SystemExit):
        export.main([str(ckpt), "--dtype", "bf16"])
    assert capsys.readouterr().err.startswith("error: --dtype applies to the file that --out writes")
    with pytest.raises(SystemExit):
        export.main([str(ckpt), "--force"])
    assert capsys.readouterr().err.startswith("error: --force applies to the file that --out writes")


def test_export_refuses_a_folder_it_cannot_write_before_reading_the_checkpoint(tmp_path, monkeypatch, capsys):
    from sit_fast import export

    ckpt = tmp_path / "0000100.pt"
    torch.save(model_for(1, 32, 2, False).state_dict(), ckpt)
    (tmp_path / "read-only").mkdir()
    real_access = os.access

    def access(path, mode):  # as for a user without write permission there (the tests may run as root)
        return not (os.path.basename(path) == "read-only" and mode & os.W_OK) and real_access(path, mode)

    monkeypatch.setattr(os, "access", access)
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(ckpt), "--out", str(tmp_path / "read-only" / "w.pt")])
    assert exit_info.value.code == 2
    assert capsys.readouterr() == ("", f"error: --out {tmp_path / 'read-only' / 'w.pt'}: {tmp_path / 'read-only'} "
                                       f"is not writable\n")
    assert os.listdir(tmp_path / "read-only") == []


def test_export_on_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    import errno

    from sit_fast import export, files

    ckpt = tmp_path / "0000100.pt"
    torch.save(model_for(1, 32, 2, False).state_dict(), ckpt)

    def full_disk(path, write):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "atomic_write", full_disk)
    for name in ("w.pt", "w.safetensors"):
        with pytest.raises(SystemExit) as exit_info:
            export.main([str(ckpt), "--out", str(tmp_path / name)])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == f"error: cannot write {tmp_path / name}: No space left on device\n"


def test_export_stopped_by_a_signal_mid_write_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    """SIGTERM (a scheduler's) in the middle of the write: the "stopped" line and 128 + 15, and neither
    the hidden partial file nor a folder made for --out left behind (the default action left both)."""
    import signal

    from sit_fast import export, files

    ckpt = tmp_path / "0000100.pt"
    torch.save(model_for(1, 32, 2, False).state_dict(), ckpt)
    real_atomic_write = files.atomic_write

    def atomic_write(path, write):
        def signalled(f):
            f.write(b"partial")
            signal.raise_signal(signal.SIGTERM)
            write(f)

        real_atomic_write(path, signalled)

    def default_action(signum, frame):
        raise AssertionError("SIGTERM reached the handler in place before the export")

    monkeypatch.setattr(files, "atomic_write", atomic_write)
    previous = signal.signal(signal.SIGTERM, default_action)
    try:
        out = tmp_path / "new" / "w.pt"
        with pytest.raises(SystemExit) as exit_info:
            export.main([str(ckpt), "--out", str(out)])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err == f"\nstopped by SIGTERM; {out} not written\n"
    assert os.listdir(tmp_path) == ["0000100.pt"]


def test_export_stopped_after_its_write_says_the_file_is_whole(tmp_path, monkeypatch, capsys):
    """SIGTERM while the written file is read back for its summary (--force over an older file): the
    line says the file was written whole, not that it was not (it is, and loads)."""
    import signal

    from sit_fast import export

    ckpt, out = tmp_path / "0000100.pt", tmp_path / "w.pt"
    torch.save(model_for(1, 32, 2, False).state_dict(), ckpt)
    out.write_bytes(b"an older export")
    real_describe = export.describe

    def describe(path, *args, **kwargs):
        if str(path) == str(out):
            signal.raise_signal(signal.SIGTERM)
        return real_describe(path, *args, **kwargs)

    def default_action(signum, frame):
        raise AssertionError("SIGTERM reached the handler in place before the export")

    monkeypatch.setattr(export, "describe", describe)
    previous = signal.signal(signal.SIGTERM, default_action)
    try:
        with pytest.raises(SystemExit) as exit_info:
            export.main([str(ckpt), "--out", str(out), "--force"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err == f"\nstopped by SIGTERM; {out} written whole, its summary not printed\n"
    assert read_checkpoint(str(out))[0].keys() == torch.load(ckpt, weights_only=True).keys()


def test_export_refuses_to_write_over_the_release_it_reads_by_name(tmp_path, monkeypatch, capsys):
    """SiT-XL-2-256x256.pt named as upstream's release is the file in the cache: --out naming that file
    (with --force) is the checkpoint being read, as it is when given by its path."""
    from sit_fast import export

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SIT_FAST_CACHE", str(tmp_path / "cache"))
    os.makedirs(tmp_path / "cache")
    release = tmp_path / "cache" / "SiT-XL-2-256x256.pt"
    torch.save(upstream_state_dict(1, 32, 2, True), release)
    before = release.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        export.main(["SiT-XL-2-256x256.pt", "--out", str(release), "--force", "--dtype", "bf16"])
    assert exit_info.value.code == 2  # refused before the release is read
    assert capsys.readouterr() == ("", f"error: --out {release} is the checkpoint being read: pass another path\n")
    assert release.read_bytes() == before


def test_export_casts_floating_point_weights_alone(tmp_path):
    """--dtype casts the floating-point tensors but pos_embed; an integer entry (an EMA's count kept in
    a plain state_dict) stays as it is, and non-contiguous tensors are written as .safetensors too."""
    from sit_fast import export
    from sit_fast.errors import UserError

    state_dict = model_for(1, 32, 2, False).state_dict()
    weight = torch.randn(tuple(reversed(state_dict["final_layer.linear.weight"].shape))).t()  # a transposed view
    state_dict = {**state_dict, "final_layer.linear.weight": weight, "n_averaged": torch.tensor(7)}
    assert not weight.is_contiguous()
    ckpt = tmp_path / "plain.pt"
    torch.save(state_dict, ckpt)
    for name in ("w.pt", "w.safetensors"):
        found = export.export_weights(str(ckpt), str(tmp_path / name), dtype="fp16")
        written, _ = read_checkpoint(tmp_path / name)
        assert written["n_averaged"].dtype == torch.int64 and written["n_averaged"].item() == 7
        assert torch.equal(written["final_layer.linear.weight"], weight.half())
        assert written["pos_embed"].dtype == torch.float32
        assert found["dtypes"] == ["float16", "float32", "int64"]
    with pytest.raises(UserError, match=r"^--dtype fp8: choose one of fp32, bf16, fp16$"):
        export.export_weights(str(ckpt), str(tmp_path / "w8.pt"), dtype="fp8")
    assert not (tmp_path / "w8.pt").exists()


def test_export_describes_what_the_file_holds_and_notes_only_a_transport_other_than_the_default(tmp_path, capsys):
    """describe(): the file's size, and no transport (None) where the file records none; a .pt export of
    a run trained with the default transport (Linear, velocity) needs no flags to sample, so no note."""
    from sit_fast import export

    weights = model_for(1, 32, 2, False).state_dict()
    torch.save(weights, tmp_path / "plain.pt")
    found = export.describe(str(tmp_path / "plain.pt"))
    assert found["transport"] is None and found["bytes"] == os.path.getsize(tmp_path / "plain.pt")
    assert "plain.pt: pickle file, " + f"{found['bytes'] / 2**20:,.1f} MiB" in export.summary("plain.pt", found)
    assert found["not_finite"] == [] and "warning" not in export.summary("plain.pt", found)
    diverged = dict(weights, **{"y_embedder.embedding_table.weight": torch.full_like(
        weights["y_embedder.embedding_table.weight"], math.nan)})
    torch.save(diverged, tmp_path / "nan.pt")
    found = export.describe(str(tmp_path / "nan.pt"))
    assert found["not_finite"] == ["y_embedder.embedding_table.weight"]
    assert export.summary("nan.pt", found).endswith(
        "\n  warning    1 tensor(s) hold NaN or inf, e.g. y_embedder.embedding_table.weight, as a diverged run saves "
        "them: its samples would be NaN (sample.py refuses them)")
    torch.save({"model": weights, "ema": weights, "step": 3,
                "args": {"path_type": "Linear", "prediction": "velocity", "model": "SiT-T/2"}}, tmp_path / "linear.pt")
    export.main([str(tmp_path / "linear.pt"), "--out", str(tmp_path / "ema.pt")])
    printed = capsys.readouterr().out
    assert "transport  --path-type Linear --prediction velocity" in printed and "note" not in printed, printed
    # one flag other than the default: that flag alone is named
    note = export.transport_note({"transport": {"path_type": "GVP", "prediction": "velocity"}}, "w.pt")
    assert "trained with --path-type GVP: pass those to sample.py" in note
    # recorded flags that are not the path type or the prediction: still nothing to sample with
    assert export.transport_words({"train_eps": 0.001, "loss_weight": None}) == (
        "not recorded (sample with --path-type and --prediction as trained)")


def test_unreadable_pickles_get_the_reason_not_torchs_advice(tmp_path):
    """A safetensors file under a .pt name and a TorchScript archive: what the file is, never torch's
    "weights_only=False will likely succeed" (the advice this project's loading exists to avoid)."""
    import warnings

    from safetensors.torch import save_file

    save_file({"pos_embed": torch.zeros(1, 4, 8)}, str(tmp_path / "st.pt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "jit.pt"))
    for name, needle in [("st.pt", r"it is a safetensors file under another extension \(name it .safetensors\)"),
                         ("jit.pt", r"it is a TorchScript archive \(torch.jit.save\), not a state_dict; if you trust "
                                    r"the file, load it with torch.jit.load and torch.save its state_dict\(\)")]:
        with pytest.raises(CheckpointError, match=rf"cannot read .*{name}: {needle}") as err:
            with warnings.catch_warnings():
                # refused before torch.load, which warns that it hands a TorchScript archive to torch.jit.load
                warnings.simplefilter("error")
                read_checkpoint(tmp_path / name)
        message = str(err.value)
        assert "\n" not in message and "weights_only" not in message and "will likely succeed" not in message


def test_usage_guide_shows_every_key_of_read_checkpoints_info(tmp_path):
    import re

    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "USAGE.md")) as f:
        guide = f.read()
    lines = guide.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("print(info)"))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].lstrip().startswith("#"))
    line = " ".join(lines[start:end])  # the comment and its continuation lines
    torch.save(upstream_state_dict(1, 32, 2, True), tmp_path / "w.pt")
    assert set(re.findall(r"'(\w+)':", line)) == set(read_checkpoint(tmp_path / "w.pt")[1]), line


def test_class_free_checkpoint_needs_class_dropout_zero_to_keep_its_label_table(tmp_path, caplog):
    """Without a null row, infer_config reports one class fewer; num_classes alone adds the null row back
    (the table no longer fits and is re-initialised), num_classes with class_dropout_prob=0 loads it."""
    free = SiT_models["SiT-T/2"](input_size=8, num_classes=10, class_dropout_prob=0)
    torch.save(free.state_dict(), tmp_path / "free.pt")
    assert infer_config(free.state_dict())["num_classes"] == 9
    with caplog.at_level(logging.WARNING, logger="sit_fast"):
        assert load_checkpoint(SiT_models["SiT-T/2"](input_size=8, num_classes=10), tmp_path / "free.pt")[
            "label_table_reinitialised"]
    assert (f"{tmp_path / 'free.pt'} has a label table of 10 rows, the model 11 (num_classes=10): the label table is "
            "re-initialised but for its last row, the null label of guidance, kept (a checkpoint of 10 classes trained "
            "without class dropout has no null row: its last row is a class; to keep its table whole, load it in "
            "Python into a model built with class_dropout_prob=0: train.py's models have the null row of class "
            "dropout); class-conditional") in caplog.text
    model = SiT_models["SiT-T/2"](input_size=8, num_classes=10, class_dropout_prob=0)
    assert not load_checkpoint(model, tmp_path / "free.pt")["label_table_reinitialised"]
    assert torch.equal(model.y_embedder.embedding_table.weight, free.y_embedder.embedding_table.weight)


def test_a_class_free_model_keeps_a_checkpoints_classes_without_its_null_row(tmp_path, caplog):
    """class_dropout_prob=0 from a checkpoint of the same classes and the null row (upstream's layout):
    the trained rows load, the null row is left out; a table of another class count is re-initialised."""
    guided = SiT_models["SiT-T/2"](input_size=8, num_classes=10)
    torch.nn.init.normal_(guided.y_embedder.embedding_table.weight)
    torch.save(guided.state_dict(), tmp_path / "guided.pt")
    model = SiT_models["SiT-T/2"](input_size=8, num_classes=10, class_dropout_prob=0)
    with caplog.at_level(logging.INFO, logger="sit_fast"):
        assert not load_checkpoint(model, tmp_path / "guided.pt")["label_table_reinitialised"]
    assert torch.equal(model.y_embedder.embedding_table.weight, guided.y_embedder.embedding_table.weight[:10])
    assert [r.levelname for r in caplog.records] == ["INFO"] and "null label" in caplog.records[0].getMessage()
    other = SiT_models["SiT-T/2"](input_size=8, num_classes=9, class_dropout_prob=0)
    with caplog.at_level(logging.INFO, logger="sit_fast"):
        assert load_checkpoint(other, tmp_path / "guided.pt")["label_table_reinitialised"]
    assert "kept" not in caplog.records[-1].getMessage()  # no null row to keep it in
    table = other.y_embedder.embedding_table.weight.detach()
    assert not any(torch.equal(row, guided.y_embedder.embedding_table.weight[-1]) for row in table)
    assert 0.01 < table.std().item() < 0.03


def test_an_unconditional_checkpoints_null_row_is_kept_for_a_class_conditional_fine_tune():
    """num_classes=0 with class dropout: a table of the null row alone, kept as the guided model's."""
    unconditional = SiT_models["SiT-T/2"](input_size=8, num_classes=0)
    torch.nn.init.normal_(unconditional.y_embedder.embedding_table.weight)
    guided = SiT_models["SiT-T/2"](input_size=8, num_classes=10)
    assert load_into_model(guided, unconditional.state_dict())["label_table_reinitialised"]
    table = guided.y_embedder.embedding_table.weight
    assert table.shape[0] == 11
    assert torch.equal(table[-1], unconditional.y_embedder.embedding_table.weight[0])


@pytest.mark.parametrize("key,change", [
    ("x_embedder.proj.weight", lambda t: t.flatten(1)),  # a linear patch embedding, as some forks have
    ("pos_embed", lambda t: t[0]),
    ("blocks.extra", lambda t: torch.zeros(1)),  # a key under blocks. that is no block index
])
def test_foreign_shapes_and_keys_are_one_line_errors(tmp_path, key, change):
    """A state_dict with SiT's key names but other shapes or extra keys: CheckpointError, not an
    IndexError or ValueError traceback from reading its configuration."""
    sd = upstream_state_dict(2, 32, 2, True)
    sd[key] = change(sd.get(key, torch.zeros(1)))
    torch.save(sd, tmp_path / "f.pt")
    with pytest.raises(CheckpointError, match="f.pt does not fit the model") as err:
        load_checkpoint(model_for(2, 32, 2, True), tmp_path / "f.pt")
    assert key in str(err.value) and "\n" not in str(err.value)
    if key != "blocks.extra":
        with pytest.raises(CheckpointError, match=rf"not a SiT state_dict: {key} has shape"):
            infer_config(sd)
    else:
        assert infer_config(sd)["depth"] == 2


def test_two_keys_that_strip_to_one_are_refused(tmp_path):
    """"pos_embed" and "module.pos_embed" both: which one is meant is unknown, so neither is loaded."""
    state_dict = model_for(2, 32, 2, True).state_dict()
    state_dict["module.pos_embed"] = torch.ones_like(state_dict["pos_embed"])
    torch.save(state_dict, tmp_path / "both.pt")
    with pytest.raises(CheckpointError, match=r"both\.pt: module\.pos_embed and pos_embed are one parameter"):
        read_checkpoint(tmp_path / "both.pt")
    with pytest.raises(CheckpointError, match=r"module\.pos_embed and pos_embed are one parameter"):
        load_into_model(model_for(2, 32, 2, True), state_dict)


@pytest.mark.parametrize("size,amount", [(1000, "1000 bytes"), (5000, "5 KiB"), (3 * 2**20, "3 MiB"),
                                         (3 * 2**30 // 2, "1.5 GiB"), (2**30, "1.0 GiB")])
def test_unfinished_writes_name_their_size(tmp_path, size, amount):
    from sit_fast.files import unfinished_writes

    with open(tmp_path / ".0000004.pt.tmp-42", "wb") as f:
        f.truncate(size)  # sparse: no disk space taken
    note = unfinished_writes(str(tmp_path), r"\d{7}\.pt", "checkpoint", "a run")
    assert f"(.0000004.pt.tmp-42; {amount})" in note, note


def test_unfinished_writes_name_three_and_count_the_rest(tmp_path):
    from sit_fast.files import unfinished_writes

    for step in range(5):
        (tmp_path / f".{step:07d}.pt.tmp-42").write_bytes(b"x")
    (tmp_path / "0000009.pt").write_bytes(b"x")  # a finished checkpoint: not named
    note = unfinished_writes(str(tmp_path), r"\d{7}\.pt", "checkpoint", "a run")
    assert note.startswith(f"{tmp_path} holds 5 unfinished checkpoint writes (.0000000.pt.tmp-42, .0000001.pt.tmp-42, "
                           f".0000002.pt.tmp-42 and 2 more; 5 bytes), left by a run killed while writing"), note
    os.remove(tmp_path / ".0000004.pt.tmp-42")
    note = unfinished_writes(str(tmp_path), r"\d{7}\.pt", "checkpoint", "a run")
    assert "(.0000000.pt.tmp-42, .0000001.pt.tmp-42, .0000002.pt.tmp-42 and 1 more; 4 bytes)" in note, note
    for step in range(1, 4):
        os.remove(tmp_path / f".{step:07d}.pt.tmp-42")
    note = unfinished_writes(str(tmp_path), r"\d{7}\.pt", "checkpoint", "a run")
    assert "holds 1 unfinished checkpoint write (.0000000.pt.tmp-42; 1 byte)" in note, note


def test_unfinished_writes_are_removed_under_the_jobs_lock_and_kept_without_it(tmp_path, monkeypatch):
    """A held lock (taken before the job's work begins) means nobody writes them now: removed, and said;
    a lock not held (not taken, or a filesystem that cannot lock) keeps them, in a warning."""
    from sit_fast import files

    lock = files.FolderLock(str(tmp_path), "--out")
    (tmp_path / ".0000004.pt.tmp-42").write_bytes(b"x" * 3)
    (tmp_path / "0000002.pt").write_bytes(b"x")
    note = files.unfinished_writes(str(tmp_path), r"\d{7}\.pt", "checkpoint", "a run", lock)
    assert note == (f"{tmp_path} holds 1 unfinished checkpoint write (.0000004.pt.tmp-42; 3 bytes), left by a run "
                    f"killed while writing: delete them unless another run is writing there now")
    lock.acquire()
    real_remove = files.os.remove

    def refused(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(files.os, "remove", refused)  # a folder the job cannot delete in: named as without the lock
    assert files.unfinished_writes(str(tmp_path), r"\d{7}\.pt", "checkpoint", "a run", lock) == note
    (tmp_path / ".0000003.pt.tmp-41").write_bytes(b"x" * 5)
    removals = []

    def second_refused(path):
        removals.append(path)
        if len(removals) == 2:
            refused(path)
        real_remove(path)

    monkeypatch.setattr(files.os, "remove", second_refused)  # the one left is named, not the one removed
    assert files.unfinished_writes(str(tmp_path), r"\d{7}\.pt", "checkpoint", "a run", lock) == (
        f"{tmp_path} holds 1 unfinished checkpoint write (.0000004.pt.tmp-42; 3 bytes), left by a run killed while "
        f"writing: delete them unless another run is writing there now")
    monkeypatch.setattr(files.os, "remove", real_remove)
    note = files.unfinished_writes(str(tmp_path), r"\d{7}\.pt", "checkpoint", "a run", lock)
    assert note == (f"removed 1 unfinished checkpoint write (.0000004.pt.tmp-42; 3 bytes) from {tmp_path}, left by a "
                    f"run killed while writing")
    assert sorted(os.listdir(tmp_path)) == [".lock", "0000002.pt"]
    assert files.unfinished_writes(str(tmp_path), r"\d{7}\.pt", "checkpoint", "a run", lock) is None
    lock.release()


def test_a_checkpoint_cut_short_is_named_as_such(tmp_path):
    """A zip archive without its end (a copy cut short) gave torch's 300-character advice, cut mid-word."""
    whole, cut = tmp_path / "whole.pt", tmp_path / "cut.pt"
    torch.save({"weight": torch.randn(1000)}, whole)
    cut.write_bytes(whole.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(cut)
    assert str(info.value) == (f"cannot read {cut}: a zip archive (torch.save's format) without the index at its "
                               f"end: truncated or damaged; copy or save it again")


@pytest.mark.parametrize("head,kind", [(b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff\xe0", "a JPEG image"),
                                       (b"<!DOCTYPE html>", "an HTML or XML file"),
                                       (b'{"model": 1}', "a JSON or text file")])
def test_a_file_of_another_kind_is_named_as_what_it_is(tmp_path, head, kind):
    """An image, a web page saved in place of a download, a config file given as --ckpt: named by
    their first bytes, not torch's word for a pickle it cannot read."""
    path = tmp_path / "weights.pt"
    path.write_bytes(head + b"\x00" * 64)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert str(info.value) == f"cannot read {path}: it is {kind}, not a checkpoint"
    path.write_bytes(b"\x80\x02junk" + b"\x00" * 64)  # a damaged pickle: torch's reason, as before
    with pytest.raises(CheckpointError, match=r"\(corrupt, truncated, or not a checkpoint written by torch.save"):
        read_checkpoint(path)


def test_a_long_library_message_is_cut_at_a_sentence_or_a_word():
    from sit_fast.errors import first_line

    sentences = RuntimeError("failed reading zip archive: failed finding central directory. "
                             + "More advice here. " * 30)
    assert first_line(sentences, limit=100) == ("failed reading zip archive: failed finding central directory. "
                                                "More advice here. More advice here.")  # the sentences that fit
    words = ValueError("a" * 10 + ", bbbbbbbb" * 40)
    assert first_line(words, limit=50) == "a" * 10 + ", bbbbbbbb" * 3 + " ..."
    assert first_line(KeyError("weight")) == "KeyError: 'weight'"
    assert first_line(ValueError("short\nsecond line")) == "short"


def test_a_message_of_exactly_the_limit_is_whole_and_an_early_sentence_end_is_not_the_cut():
    from sit_fast.errors import first_line

    exact = "word " * 19 + "words"  # 100 characters
    assert first_line(ValueError(exact), limit=100) == exact
    # a sentence ending in the first third would leave too little: the cut is at a word instead
    early = ValueError("No. " + "more words " * 20)
    assert first_line(early, limit=60) == "No. " + "more words " * 4 + "more words ..."
    assert first_line(ValueError("\n  \n")) == "ValueError"  # nothing to quote: the exception's type


def test_out_of_memory_is_told_on_the_gpu_and_on_the_cpu_and_through_a_wrapper():
    """torch's out-of-memory errors on a GPU and on the CPU, and Python's MemoryError, are each out of
    memory, also behind the exception torch.compile wraps them in; the kind of memory is the GPU's
    for a GPU's error alone."""
    from sit_fast.errors import is_out_of_memory, memory_kind

    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 400000000000 bytes. Error code 12 (Cannot allocate memory)")
    gpu = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    cublas = RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
    for error, kind in ((cpu, "memory"), (gpu, "GPU memory"), (MemoryError(), "memory"), (cublas, "GPU memory")):
        try:
            try:
                raise error
            except BaseException as inner:
                raise RuntimeError("backend='inductor' raised: the error above") from inner
        except RuntimeError as wrapped:
            assert is_out_of_memory(error) and is_out_of_memory(wrapped)
            assert memory_kind(error) == memory_kind(wrapped) == kind
    assert not is_out_of_memory(RuntimeError("Expected all tensors to be on the same device"))


def test_an_allocation_larger_than_the_whole_device_is_told_as_a_size_too_large():
    """An allocation that failed for asking more than the device has in all is a flag's value far
    too large, named with the flags to check; one that would fit an emptier device is not."""
    from sit_fast.errors import allocation_past_device, device_bytes

    cpu = torch.device("cpu")
    total = device_bytes(cpu)
    assert total is not None and total > 2**20
    too_large = RuntimeError(f"DefaultCPUAllocator: can't allocate memory: you tried to allocate {4 * total} bytes. "
                             "Error code 12 (Cannot allocate memory)")
    message = allocation_past_device(too_large, cpu, "--image-size 100000")
    assert message.startswith("out of memory on cpu: one allocation asked for ")
    assert "in all: a size given is far too large (check --image-size 100000)" in message
    gib = 4 * total / 2**30
    assert f"asked for {gib:.1f} GiB, " in message or f"asked for {gib / 1024:.1f} TiB, " in message
    fits = RuntimeError(f"DefaultCPUAllocator: can't allocate memory: you tried to allocate {total // 2} bytes.")
    assert allocation_past_device(fits, cpu, "--image-size 8") is None
    gpu = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 16777216.00 TiB. GPU 0 has ...")
    assert allocation_past_device(gpu, cpu, "--batch-size 8").startswith(
        "out of GPU memory on cpu: one allocation asked for 16777216.0 TiB, more than the ")
    assert allocation_past_device(MemoryError(), cpu, "--batch-size 8") is None  # no size said
    with pytest.raises(RuntimeError) as overflowed:  # 2**63 bytes or more: torch counts no size, allocates nothing
        torch.empty(2**62, 2)
    assert allocation_past_device(overflowed.value, cpu, "--batch-size 2").startswith(
        "out of memory on cpu: one allocation asked for 2**63 bytes or more, more than the ")


def test_byte_amounts_are_said_alike_in_every_message(monkeypatch):
    """Sizes on disk and allocations were said by two functions in two styles ("3 MiB" beside "3.0 MiB",
    "2048.0 GiB" for 2 TiB): one, sit_fast.errors.amount, says them all."""
    from sit_fast import errors, files

    assert files.amount is errors.amount
    assert [errors.amount(n) for n in (1, 1000, 5000, 3 * 2**20, 3 * 2**30 // 2, 2**41, 2.5 * 2**20)] == [
        "1 byte", "1000 bytes", "5 KiB", "3 MiB", "1.5 GiB", "2.0 TiB", "2 MiB"]
    monkeypatch.setattr(errors, "device_bytes", lambda device: 3 * 2**20)
    error = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 5242880 bytes.")
    assert errors.allocation_past_device(error, torch.device("cpu"), "--batch-size 8") == (
        "out of memory on cpu: one allocation asked for 5 MiB, more than the 3 MiB it has in all: a size given is "
        "far too large (check --batch-size 8)")


def test_a_recorded_model_config_beside_upstream_style_args_is_read(tmp_path):
    """A checkpoint holding an argparse.Namespace (upstream's args) and a model_config: the config was
    read without the Namespace allowed, so the file's latent space was lost (export, sample.py)."""
    from sit_fast.checkpoint import recorded_model_config

    path = tmp_path / "ckpt.pt"
    config = {"model": "SiT-T/4", "latent_space": "pixels"}
    torch.save({"model": {}, "args": argparse.Namespace(model="SiT-T/4"), "model_config": config}, path)
    assert recorded_model_config(path) == config


def test_a_file_named_as_a_dit_release_is_warned_of(tmp_path, caplog):
    """DiT's releases load (the same keys and shapes) but are another model of time and noise."""
    torch.save(upstream_state_dict(1, 32, 2, True), tmp_path / "DiT-XL-2-256x256.pt")
    torch.save(upstream_state_dict(1, 32, 2, True), tmp_path / "SiT-XL-2-256x256.pt")
    with caplog.at_level(logging.WARNING, logger="sit_fast"):
        read_checkpoint(tmp_path / "SiT-XL-2-256x256.pt")
        assert not caplog.records
        read_checkpoint(tmp_path / "DiT-XL-2-256x256.pt")
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'DiT-XL-2-256x256.pt'} is named as one of DiT's releases: DiT predicts DDPM noise at integer "
        f"times 0..999, not what SiT's transports (times in [0, 1]) expect: sampled as it is, it gives meaningless "
        f"images (as weights to train from, it serves)"]


def test_a_checkpoint_of_dit_training_is_warned_of(tmp_path, caplog):
    """DiT's train.py checkpoints (model, ema, opt, args) have SiT's keys too; their args name the model."""
    weights = upstream_state_dict(1, 32, 2, True)
    for name, model in (("dit.pt", "DiT-S/2"), ("sit.pt", "SiT-S/2")):
        torch.save({"model": weights, "ema": weights, "opt": {}, "args": argparse.Namespace(model=model)},
                   tmp_path / name)
    with caplog.at_level(logging.WARNING, logger="sit_fast"):
        read_checkpoint(tmp_path / "sit.pt")
        assert not caplog.records
        read_checkpoint(tmp_path / "dit.pt", prefer="model")
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'dit.pt'} is a checkpoint of DiT's training (its args: --model DiT-S/2): DiT predicts DDPM "
        f"noise at integer times 0..999, not what SiT's transports (times in [0, 1]) expect: sampled as it is, it "
        f"gives meaningless images (as weights to train from, it serves)"]


class _Response:
    """What urlopen returns, as far as the download reads it: headers, read(n), a context manager."""

    def __init__(self, body: bytes, length: int | None, fail_after: int | None = None, error: BaseException = None):
        self.body, self.at, self.fail_after, self.error = body, 0, fail_after, error
        self.headers = {"Content-Length": str(length)} if length is not None else {}

    def read(self, n: int) -> bytes:
        if self.fail_after is not None and self.at >= self.fail_after:
            import http.client

            raise self.error or http.client.IncompleteRead(self.body[: self.at], len(self.body) - self.at)
        end = self.at + n if self.fail_after is None else min(self.at + n, self.fail_after)
        chunk = self.body[self.at: end]
        self.at += len(chunk)
        return chunk

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_release_download_is_kept_only_whole_and_a_checkpoint(tmp_path, monkeypatch):
    """The release download goes into the cache only when it came whole (Content-Length) and is a
    torch.save file: a connection cut short, a read that fails mid-way, or a web page in its place is
    a UserError, and leaves nothing in the cache (the next run downloads again)."""
    import io
    import urllib.request

    from sit_fast.errors import UserError
    from sit_fast.sampling import pretrained_checkpoint

    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    monkeypatch.setenv("SIT_FAST_CACHE", str(cache))
    buffer = io.BytesIO()
    sd = upstream_state_dict(1, 32, 2, True)
    torch.save(sd, buffer)
    good = buffer.getvalue()
    page = b"<!DOCTYPE html><html>quota exceeded</html>"
    cases = [(_Response(good[:1000], len(good)), f"the connection closed after 1000 of {len(good)} bytes"),
             (_Response(good, len(good), fail_after=5000), "IncompleteRead"),
             (_Response(page, len(page)), "what came is not a checkpoint file (a web page in its place?)")]
    for response, needle in cases:
        monkeypatch.setattr(urllib.request, "urlopen", lambda *args, response=response, **kwargs: response)
        with pytest.raises(UserError) as info:
            pretrained_checkpoint()
        assert str(info.value).startswith("cannot download the released checkpoint SiT-XL-2-256x256.pt (") and \
            needle in str(info.value), info.value
        assert os.listdir(cache) == []
    monkeypatch.setattr(urllib.request, "urlopen", lambda *args, **kwargs: _Response(good, None))
    path = pretrained_checkpoint()
    assert path == str(cache / "SiT-XL-2-256x256.pt") and os.listdir(cache) == ["SiT-XL-2-256x256.pt"]
    state_dict, _ = read_checkpoint(path)
    assert all(torch.equal(state_dict[k], sd[k]) for k in sd)


def test_a_release_download_stopped_or_refused_by_the_disk_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    """Ctrl-C or a stop signal mid-way comes out as it is, and a full disk as a line that names the cache
    and how to make room; neither leaves its partial file (the size of the release) in the cache."""
    import errno
    import io
    import signal
    import urllib.request

    from sit_fast.errors import UserError
    from sit_fast.interrupts import Stopped
    from sit_fast.sampling import pretrained_checkpoint

    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    monkeypatch.setenv("SIT_FAST_CACHE", str(cache))
    buffer = io.BytesIO()
    torch.save(upstream_state_dict(1, 32, 2, True), buffer)
    good = buffer.getvalue()
    for stop in (KeyboardInterrupt(), Stopped(signal.SIGTERM)):
        response = _Response(good, len(good), fail_after=5000, error=stop)
        monkeypatch.setattr(urllib.request, "urlopen", lambda *a, response=response, **k: response)
        with pytest.raises(KeyboardInterrupt) as info:
            pretrained_checkpoint()
        assert info.value is stop and os.listdir(cache) == []
    def refused() -> str:
        with pytest.raises(UserError) as info:
            pretrained_checkpoint()
        return str(info.value)

    release = os.path.join("pretrained_models", "SiT-XL-2-256x256.pt")
    full = OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: _Response(good, len(good), 5000, full))
    assert refused() == (f"cannot write the released checkpoint SiT-XL-2-256x256.pt into {cache} (No space left on "
                         f"device): make room there, set SIT_FAST_CACHE to a folder that can take it, or copy the file "
                         f"to {release}")
    assert os.listdir(cache) == []
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("SIT_FAST_CACHE", str(tmp_path / "a_file" / "cache"))  # a folder that cannot be made
    assert refused() == (f"cannot make the folder {tmp_path / 'a_file' / 'cache'} for the released checkpoint "
                         f"SiT-XL-2-256x256.pt (Not a directory): set SIT_FAST_CACHE to a folder that can be made, or "
                         f"copy the file to {release}")


def test_a_downloaded_release_is_taken_from_the_cache_and_may_be_in_the_old_format(tmp_path, monkeypatch):
    """A release in the cache is not downloaded again (offline, it is still found); a download in
    torch.save's format before torch 1.6 (a plain pickle) is a checkpoint file too."""
    import io
    import urllib.error
    import urllib.request

    from sit_fast.sampling import pretrained_checkpoint

    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    monkeypatch.setenv("SIT_FAST_CACHE", str(cache))
    buffer = io.BytesIO()
    sd = upstream_state_dict(1, 32, 2, True)
    torch.save(sd, buffer, _use_new_zipfile_serialization=False)
    old = buffer.getvalue()
    assert old[:1] == b"\x80"
    fetched = []

    def download(*args, **kwargs):
        fetched.append(args[0])
        return _Response(old, len(old))

    monkeypatch.setattr(urllib.request, "urlopen", download)
    path = pretrained_checkpoint()
    assert path == str(cache / "SiT-XL-2-256x256.pt") and len(fetched) == 1
    state_dict, _ = read_checkpoint(path)
    assert all(torch.equal(state_dict[k], sd[k]) for k in sd)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert pretrained_checkpoint() == path and len(fetched) == 1


def test_a_release_that_cannot_be_had_is_a_user_error_naming_why(tmp_path, monkeypatch):
    """Offline, the message gives the network's reason as it came; a name that is not a release names
    those there are."""
    import urllib.error
    import urllib.request

    from sit_fast.errors import UserError
    from sit_fast.sampling import pretrained_checkpoint

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SIT_FAST_CACHE", str(tmp_path / "cache"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UserError, match=r"^cannot download the released checkpoint SiT-XL-2-256x256\.pt "
                                        r"\(no network\); without a network, copy it to "):
        pretrained_checkpoint()
    # from Python (read_checkpoint, load_checkpoint), the way out is a local file's path, not a flag
    with pytest.raises(UserError, match=r"or pass a local checkpoint's path instead \(the path argument\)$"):
        read_checkpoint("SiT-XL-2-256x256.pt")
    with pytest.raises(UserError) as info:
        pretrained_checkpoint("SiT-XL-2-512x512.pt")
    assert str(info.value) == "no released checkpoint named 'SiT-XL-2-512x512.pt' (released: SiT-XL-2-256x256.pt)"


def test_training_transport_keeps_plain_values_of_the_transport_flags_alone():
    """What export writes as JSON: the transport flags' plain values, nothing else of the args."""
    args = {"path_type": "VP", "prediction": None, "train_eps": 0.001, "sample_eps": torch.tensor(0.1),
            "loss_weight": ["velocity"], "model": "SiT-XL/2"}
    assert training_transport(args) == {"path_type": "VP", "prediction": None, "train_eps": 0.001}


def test_a_training_checkpoint_without_ema_given_to_load_into_model_is_named():
    sd = upstream_state_dict(1, 32, 2, True)
    with pytest.raises(CheckpointError, match=r"^ckpt\.pt is a training checkpoint \(entries model, step\), not a "
                                              r"state_dict: pass its \['model'\] entry"):
        load_into_model(model_for(1, 32, 2, True), {"model": sd, "step": 5}, source="ckpt.pt")


def test_a_step_that_is_not_an_integer_is_not_reported(tmp_path):
    sd = upstream_state_dict(1, 32, 2, True)
    torch.save({"model": sd, "ema": sd, "step": True}, tmp_path / "c.pt")
    assert read_checkpoint(tmp_path / "c.pt")[1]["step"] is None
    torch.save({"model": sd, "ema": sd, "step": 7}, tmp_path / "c.pt")
    assert read_checkpoint(tmp_path / "c.pt")[1]["step"] == 7


def test_atomic_write_syncs_the_whole_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """A power cut after the rename must not leave an empty or partial file under the final name."""
    from sit_fast import files

    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync dir",) if stat.S_ISDIR(st.st_mode) else ("fsync file", st.st_size))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    files.atomic_write(str(tmp_path / "out.bin"), lambda f: f.write(b"x" * 1000))
    assert events == [("fsync file", 1000), ("replace", "out.bin"), ("fsync dir",)]
    assert (tmp_path / "out.bin").read_bytes() == b"x" * 1000


def test_atomic_write_keeps_the_permission_bits_of_the_file_it_replaces(tmp_path):
    """A file made private (0600) stays private when rewritten (export --force, settings.json); a new
    file takes the umask's bits, as open() gives them."""
    from sit_fast import files

    private, new = tmp_path / "private.pt", tmp_path / "new.pt"
    private.write_bytes(b"old")
    os.chmod(private, 0o600)
    files.atomic_write(str(private), lambda f: f.write(b"new"))
    assert private.read_bytes() == b"new" and stat.S_IMODE(os.stat(private).st_mode) == 0o600
    umask = os.umask(0o027)
    try:
        files.atomic_write(str(new), lambda f: f.write(b"new"))
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(new).st_mode) == 0o640


def test_atomic_write_onto_a_link_writes_the_file_it_names(tmp_path):
    """--out (a grid, an export) given as a symbolic link: the file the link names gets the contents and
    the link stays (the rename put a file in its place and left the target stale); a dangling link
    makes its target."""
    from sit_fast import files

    (tmp_path / "elsewhere").mkdir()
    target, link = tmp_path / "elsewhere" / "grid.png", tmp_path / "grid.png"
    target.write_bytes(b"old")
    os.symlink(target, link)
    files.atomic_write(str(link), lambda f: f.write(b"new"))
    assert os.path.islink(link) and target.read_bytes() == b"new"
    assert os.listdir(tmp_path / "elsewhere") == ["grid.png"] and sorted(os.listdir(tmp_path)) == ["elsewhere",
                                                                                                  "grid.png"]
    dangling = tmp_path / "dangling.pt"
    os.symlink(tmp_path / "elsewhere" / "made.pt", dangling)
    files.atomic_torch_save({"a": 1}, str(dangling))
    assert os.path.islink(dangling) and os.path.isfile(tmp_path / "elsewhere" / "made.pt")


def test_atomic_write_of_a_name_near_the_length_limit(tmp_path):
    """A final name of 250 bytes (a grid named so, a long checkpoint stem's .npz): the temporary name,
    longer by its ".tmp-PID", was past the file system's 255 and failed with a traceback."""
    from sit_fast import files

    for name in ("a" * 251 + ".png", "é" * 124 + ".npz"):  # 255 bytes; UTF-8's two bytes a letter
        files.atomic_write(str(tmp_path / name), lambda f: f.write(b"x"))
        assert (tmp_path / name).read_bytes() == b"x"
    assert sorted(os.listdir(tmp_path)) == sorted(["a" * 251 + ".png", "é" * 124 + ".npz"])


def _third_write_raises(monkeypatch, error: BaseException) -> None:
    """Files that sit_fast.files opens raise `error` from their third write (mid-file: a failed first
    write comes out of torch.save as is)."""
    import builtins

    from sit_fast import files

    class Failing:
        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, data):
            self.writes += 1
            if self.writes > 2:
                raise error
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(files, "open", lambda path, mode="r", *a, **k: Failing(builtins.open(path, mode, *a, **k)),
                        raising=False)


def test_atomic_torch_save_on_a_full_disk_raises_the_oserror_naming_the_file(tmp_path, monkeypatch):
    """torch.save's writer turns a failed write into a RuntimeError naming its own position; the
    caller's one-line "cannot write PATH (No space left on device)" needs the OSError back."""
    import errno

    from sit_fast import files

    _third_write_raises(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    target = tmp_path / "0000004.pt"
    with pytest.raises(OSError) as info:
        files.atomic_torch_save({"w": torch.zeros(1000)}, str(target))
    assert (info.value.errno, info.value.filename) == (errno.ENOSPC, str(target))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_atomic_torch_save_stopped_mid_write_raises_the_stop(tmp_path, monkeypatch, signal_name):
    """A stop signal's handler raises where the main thread is, often inside a write of torch.save's:
    the stop (Stopped, or Ctrl-C's KeyboardInterrupt) comes out, for the job's "stopped" line and exit
    status, not the RuntimeError torch.save's writer turns it into."""
    import signal

    from sit_fast import files
    from sit_fast.interrupts import Stopped

    stop = Stopped(signal.SIGTERM) if signal_name == "SIGTERM" else KeyboardInterrupt()
    _third_write_raises(monkeypatch, stop)
    with pytest.raises(KeyboardInterrupt) as info:
        files.atomic_torch_save({"w": torch.zeros(1000)}, str(tmp_path / "0000004.pt"))
    assert info.value is stop
    assert os.listdir(tmp_path) == []


def test_atomic_torch_save_stopped_as_a_write_begins_raises_the_stop(tmp_path, monkeypatch):
    """The handler may run as the writer's write() is entered, before it can keep what it raises:
    the stop still comes out, not torch's "unexpected pos" RuntimeError (a traceback and exit 1)."""
    import signal

    from sit_fast import files
    from sit_fast.interrupts import Stopped

    stop, write, calls = Stopped(signal.SIGTERM), files._KeepWriteError.write, []

    def stopped_on_entry(self, data):
        calls.append(1)
        if len(calls) == 3:
            raise stop
        return write(self, data)

    monkeypatch.setattr(files._KeepWriteError, "write", stopped_on_entry)
    with pytest.raises(KeyboardInterrupt) as info:
        files.atomic_torch_save({"w": torch.zeros(1000), "v": torch.ones(10)}, str(tmp_path / "shard-00002.pt"))
    assert info.value is stop
    assert os.listdir(tmp_path) == []


def test_atomic_torch_save_raises_a_runtime_error_not_from_a_write_as_it_is(tmp_path):
    from sit_fast import files

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this object")

    with pytest.raises(RuntimeError, match="^cannot pickle this object$"):
        files.atomic_torch_save({"w": torch.zeros(3), "x": Unsaveable()}, str(tmp_path / "0000004.pt"))
    assert os.listdir(tmp_path) == []


def test_make_folder_makes_the_missing_parents_and_names_a_file_in_the_way(tmp_path, monkeypatch):
    """make_folder: every missing folder made; a file at the path or above it, or a folder that cannot be
    made, is a UserError naming the flag and the fix."""
    import errno

    from sit_fast import files
    from sit_fast.errors import UserError

    files.make_folder(str(tmp_path / "a" / "b"), "--out")
    assert (tmp_path / "a" / "b").is_dir()
    files.make_folder(str(tmp_path / "a" / "b"), "--out")  # there already
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for path in (blocker, blocker / "sub" / "run"):
        with pytest.raises(UserError, match=rf"^--out: {blocker} is a file: pass a folder$"):
            files.make_folder(str(path), "--out")

    def refused(path, exist_ok=False):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(files.os, "makedirs", refused)
    with pytest.raises(UserError, match=rf"^--out: cannot create the folder {tmp_path / 'c'} \(Permission denied\): "
                                        r"pass a folder that can be written$"):
        files.make_folder(str(tmp_path / "c"), "--out")


def test_make_folder_names_a_link_that_leads_nowhere_and_a_fifo_in_the_way(tmp_path, monkeypatch):
    """A results folder linked to a scratch disk not mounted, or a loop of links: said so, not "File exists"."""
    from sit_fast import files
    from sit_fast.errors import UserError

    (tmp_path / "runs").symlink_to(tmp_path / "scratch" / "runs")
    for path in (tmp_path / "runs", tmp_path / "runs" / "001-SiT"):
        with pytest.raises(UserError, match=rf"^--results-dir: {tmp_path / 'runs'} is a link to "
                                            rf"{tmp_path / 'scratch' / 'runs'}, which does not exist: pass a "
                                            r"folder, or make the link lead to one$"):
            files.make_folder(str(path), "--results-dir")
    (tmp_path / "loop1").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop1")
    with pytest.raises(UserError, match=rf"^--out: {tmp_path / 'loop1'} is a link in a loop of links: pass a folder, "
                                        r"or make the link lead to one$"):
        files.make_folder(str(tmp_path / "loop1"), "--out")
    stat = os.stat

    def no_permission(path, *args, **kwargs):
        if str(path) == str(tmp_path / "runs"):
            raise PermissionError(13, "Permission denied", path)
        return stat(path, *args, **kwargs)

    monkeypatch.setattr(files.os, "stat", no_permission)  # a folder on the way that this user cannot enter
    with pytest.raises(UserError, match=rf"^--out: {tmp_path / 'runs'} is a link to {tmp_path / 'scratch' / 'runs'}, "
                                        r"which cannot be reached \(Permission denied\): pass a folder"):
        files.make_folder(str(tmp_path / "runs"), "--out")
    monkeypatch.setattr(files.os, "stat", stat)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UserError, match=rf"^--out: {tmp_path / 'fifo'} is not a folder: pass a folder$"):
        files.make_folder(str(tmp_path / "fifo" / "run"), "--out")
    (tmp_path / "scratch" / "runs").mkdir(parents=True)
    files.make_folder(str(tmp_path / "runs" / "001-SiT"), "--results-dir")  # the link leads somewhere now
    assert (tmp_path / "scratch" / "runs" / "001-SiT").is_dir()


def test_make_folder_names_the_folder_it_could_not_make_not_the_one_asked_for(tmp_path, monkeypatch):
    """--exp-dir /sys/e: /sys/e is what cannot be made, not /sys/e/checkpoints."""
    import errno

    from sit_fast import files
    from sit_fast.errors import UserError

    mkdir = os.mkdir

    def refused_at_d(path, mode=0o777):
        if os.path.basename(path) == "d":
            raise PermissionError(errno.EPERM, "Operation not permitted", path)
        return mkdir(path, mode)

    monkeypatch.setattr(files.os, "mkdir", refused_at_d)
    with pytest.raises(UserError, match=rf"^--exp-dir: cannot create the folder {tmp_path / 'd'} \(Operation not "
                                        r"permitted\): pass a folder that can be written$"):
        files.make_folder(str(tmp_path / "d" / "checkpoints"), "--exp-dir")


def test_make_writable_folder_refuses_a_folder_it_cannot_write_into(tmp_path, monkeypatch):
    import errno

    from sit_fast import files
    from sit_fast.errors import UserError

    def read_only(dir):
        raise OSError(errno.EROFS, "Read-only file system")

    files.make_writable_folder(str(tmp_path / "out"), "--sample-dir")
    assert os.listdir(tmp_path / "out") == []  # the file written to check is gone
    monkeypatch.setattr(files.tempfile, "TemporaryFile", read_only)
    with pytest.raises(UserError, match=rf"^--sample-dir: cannot write into the folder {tmp_path / 'out'} \(Read-only "
                                        r"file system\): pass a folder that can be written$"):
        files.make_writable_folder(str(tmp_path / "out"), "--sample-dir")


def test_first_missing_folder_is_the_outermost_that_makedirs_would_make(tmp_path):
    from sit_fast.files import first_missing_folder

    assert first_missing_folder(str(tmp_path)) is None
    assert first_missing_folder(str(tmp_path / "a" / "b" / "c")) == str(tmp_path / "a")
    (tmp_path / "a").mkdir()
    assert first_missing_folder(str(tmp_path / "a" / "b" / "c")) == str(tmp_path / "a" / "b")


def test_remove_empty_folders_goes_up_to_and_including_its_end_while_they_are_empty(tmp_path):
    """A folder gone already is passed over; the first that is not empty stops it; nothing outside up_to
    (a sibling whose name begins as up_to's) is removed."""
    from sit_fast.files import remove_empty_folders

    (tmp_path / "run" / "a" / "b").mkdir(parents=True)
    remove_empty_folders(str(tmp_path / "run" / "a" / "b" / "gone"), str(tmp_path / "run"))
    assert os.listdir(tmp_path) == []
    (tmp_path / "run" / "a" / "b").mkdir(parents=True)
    (tmp_path / "run" / "kept.txt").write_text("")
    remove_empty_folders(str(tmp_path / "run" / "a" / "b"), str(tmp_path / "run"))
    assert os.listdir(tmp_path / "run") == ["kept.txt"]
    (tmp_path / "run-2" / "a").mkdir(parents=True)
    remove_empty_folders(str(tmp_path / "run-2" / "a"), str(tmp_path / "run"))
    assert (tmp_path / "run-2" / "a").is_dir()


def test_a_write_in_progress_is_the_hidden_file_unfinished_writes_names(tmp_path):
    """atomic_write writes into .NAME.tmp-PID, the name unfinished_writes looks for (a writer killed there
    leaves it); a folder of such a name adds nothing to the size said."""
    from sit_fast import files

    seen = []

    def write(f):
        f.write(b"x" * 10)
        f.flush()
        seen.append((os.listdir(tmp_path), files.unfinished_writes(str(tmp_path), r"\d{7}\.pt", "checkpoint", "a run")))

    files.atomic_write(str(tmp_path / "0000004.pt"), write)
    (listed, note), = seen
    assert listed == [f".0000004.pt.tmp-{os.getpid()}"]
    assert f"(.0000004.pt.tmp-{os.getpid()}; 10 bytes)" in note, note
    os.mkdir(tmp_path / ".0000005.pt.tmp-7")
    note = files.unfinished_writes(str(tmp_path), r"\d{7}\.pt", "checkpoint", "a run")
    assert "holds 1 unfinished checkpoint write (.0000005.pt.tmp-7; 0 bytes)" in note, note


def test_an_error_of_the_writer_that_is_no_system_call_is_raised_as_it_is(tmp_path):
    """An OSError without an errno (the writer's own, not a failed write) is not given the path."""
    from sit_fast import files

    def write(f):
        raise OSError("the writer's own error")

    with pytest.raises(OSError) as info:
        files.atomic_write(str(tmp_path / "out.bin"), write)
    assert (info.value.errno, info.value.filename, str(info.value)) == (None, None, "the writer's own error")
    assert os.listdir(tmp_path) == []


def test_a_folder_lock_says_who_holds_it_and_a_refused_one_keeps_no_file_open(tmp_path, monkeypatch):
    """.lock holds the holder's line alone (not the end of a longer one before it); a job refused the lock
    (EWOULDBLOCK, or EACCES where the system says so) closes the file it opened."""
    import errno
    import fcntl
    import socket

    from sit_fast.errors import UserError
    from sit_fast.files import FolderLock

    (tmp_path / ".lock").write_text("process 1 on a host whose name is much longer than this one's\n" * 3)
    with FolderLock(str(tmp_path), "--out") as lock:
        lock.acquire()
        assert (tmp_path / ".lock").read_text() == f"process {os.getpid()} on {socket.gethostname()}\n"
        open_files = len(os.listdir("/proc/self/fd"))
        with pytest.raises(UserError, match=rf"^another job is writing into {tmp_path} now \(process {os.getpid()} "):
            FolderLock(str(tmp_path), "--out").acquire()
        assert len(os.listdir("/proc/self/fd")) == open_files

    # The holder's line is written before the older text is cut off: a job refused in between names it alone.
    (tmp_path / ".lock").write_text("process 5 on host-a\nost whose name is much longer than this one's\n")
    fd = os.open(tmp_path / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(UserError, match=rf"^another job is writing into {tmp_path} now \(process 5 on host-a\): "):
            FolderLock(str(tmp_path), "--out").acquire()
    finally:
        os.close(fd)

    def busy(fd, operation):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(fcntl, "flock", busy)
    with pytest.raises(UserError, match=r"wait for it to end, or pass another --out$"):
        FolderLock(str(tmp_path), "--out").acquire()


def test_a_lock_seen_held_for_an_instant_by_a_reader_is_taken(tmp_path, monkeypatch):
    """FolderLock.holder takes a folder's lock shared for an instant to see who holds it: a job that
    tries the lock in that instant looks again rather than being refused in the name of the lock file's
    last holder (perhaps a job long ended); a lock held on is still refused, naming its holder."""
    import errno
    import fcntl
    import socket

    from sit_fast import files
    from sit_fast.errors import UserError
    from sit_fast.files import FolderLock

    with open(tmp_path / ".lock", "w") as f:
        f.write("process 999999 on a-host-long-gone\n")
    real_flock, tries = fcntl.flock, []

    def seen_by_a_reader_first(fd, operation):
        tries.append(operation)
        if len(tries) == 1:
            raise BlockingIOError(errno.EWOULDBLOCK, "Resource temporarily unavailable")
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", seen_by_a_reader_first)
    lock = FolderLock(str(tmp_path), "--sample-dir")
    lock.acquire()
    monkeypatch.undo()
    try:
        assert lock.fd is not None and len(tries) == 2
        assert FolderLock.holder(str(tmp_path)) == f"process {os.getpid()} on {socket.gethostname()}"
        monkeypatch.setattr(files, "BUSY_PAUSE_S", 0.0)
        with pytest.raises(UserError) as refused:  # held on: refused after its looks
            FolderLock(str(tmp_path), "--sample-dir").acquire()
        assert str(refused.value).startswith(f"another job is writing into {tmp_path} now (process {os.getpid()} on ")
    finally:
        lock.release()


def test_a_folder_locks_holder_is_told_while_it_holds_it_and_only_then(tmp_path):
    """FolderLock.holder: the holder's line while the lock is held (by another open of the file: another
    process), the file's path where it wrote none; None with no lock file, once the lock is dropped (the
    file left is no lock), and where no lock can be taken; it leaves no file open, nor the lock taken."""
    import fcntl
    import socket

    from sit_fast.files import FolderLock

    assert FolderLock.holder(str(tmp_path)) is None and not (tmp_path / ".lock").exists()  # and none made
    open_files = len(os.listdir("/proc/self/fd"))
    with FolderLock(str(tmp_path), "--out") as lock:
        lock.acquire()
        assert FolderLock.holder(str(tmp_path)) == f"process {os.getpid()} on {socket.gethostname()}"
        assert len(os.listdir("/proc/self/fd")) == open_files + 1  # the lock's own
    assert FolderLock.holder(str(tmp_path)) is None
    with FolderLock(str(tmp_path), "--out") as lock:
        lock.acquire()  # not refused: the look took the lock for an instant only
    (tmp_path / ".lock").write_text("")
    fd = os.open(tmp_path / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert FolderLock.holder(str(tmp_path)) == f"it holds {tmp_path / '.lock'}"
    finally:
        os.close(fd)
    assert len(os.listdir("/proc/self/fd")) == open_files


def test_a_folder_lock_is_not_held_on_by_the_processes_its_holder_forked(tmp_path):
    """A data loader's workers, forked by the lock's holder, shared its lock file, and the lock with it:
    the holder killed, the lock stayed until the last worker noticed (seconds), and a job started then
    was refused in the dead holder's name. Forked, a process leaves the lock to its holder."""
    from sit_fast.files import FolderLock

    lock = FolderLock(str(tmp_path), "--out")
    lock.acquire()
    started_r, started_w = os.pipe()
    end_r, end_w = os.pipe()
    child = os.fork()
    if child == 0:  # a loader's worker: it lives on after the holder has let go
        try:
            os.write(started_w, b"s")  # os.fork has returned here: what a fork does in the child is done
            os.read(end_r, 1)
        finally:
            os._exit(0)
    os.read(started_r, 1)
    try:
        lock.release()  # as the holder's end drops it
        assert FolderLock.holder(str(tmp_path)) is None
        with FolderLock(str(tmp_path), "--out") as again:
            again.acquire()
            assert again.fd is not None
    finally:
        os.write(end_w, b"e")  # the worker ends
        os.waitpid(child, 0)
        for fd in (started_r, started_w, end_r, end_w):
            os.close(fd)


def test_an_error_of_a_write_without_the_oss_word_is_not_said_to_be_the_disks():
    """write_failed makes the one line of a failed write from an error of the OS (an errno); an OSError
    without one is a library's own (a fault of the program, not of the disk): raised as it is, not said to
    be a failing disk to fix."""
    import errno

    from sit_fast.files import write_failed

    said = write_failed("out.png", OSError(errno.EIO, "Input/output error"), "nothing was written yet", "run it again")
    assert str(said) == ("cannot write out.png (Input/output error, EIO): nothing was written yet: fix the disk (the "
                         "system log says what failed), or write onto another filesystem and run it again")
    own = OSError("unrecognized data stream contents when reading image file")
    with pytest.raises(OSError) as raised:
        write_failed("out.png", own, "nothing was written yet", "run it again")
    assert raised.value is own


def test_a_failed_read_is_one_line_naming_the_file_the_oss_error_and_the_fix():
    """read_failed, write_failed's line for a read: a failing disk's EIO named with its errno and the disk
    to fix, a refused read the permission to give, a file gone the file to put back; an OSError without an
    errno (a library's own) raised as it is."""
    import errno

    from sit_fast.files import read_failed

    for code, said in ((errno.EIO, "Input/output error, EIO): fix the disk (the system log says what failed)"),
                       (errno.EACCES, "Permission denied): make it readable"),
                       (errno.ENOENT, "No such file or directory, ENOENT): put it back")):
        line = read_failed("in/x.png", OSError(code, os.strerror(code)), "", "run it again")
        assert str(line) == f"cannot read in/x.png ({said} and run it again"
    line = read_failed("in/x.png", OSError(errno.EIO, "Input/output error"), "nothing was written yet", "run it again")
    assert str(line) == ("cannot read in/x.png (Input/output error, EIO): nothing was written yet: fix the disk (the "
                         "system log says what failed) and run it again")
    own = OSError("image file is truncated")
    with pytest.raises(OSError) as raised:
        read_failed("in/x.png", own, "", "run it again")
    assert raised.value is own


def test_a_file_lock_goes_with_its_holder_and_a_job_that_opened_it_then_takes_the_new_one(tmp_path, monkeypatch):
    """FileLock (sample.py's --out): .NAME.lock beside the file, refused while another holds it, and removed
    as it is released, so that none is left beside the outputs. A job that opened the file just before
    its removal gets the lock of a removed file once the holder lets go: it opens the new one instead, or
    it and a job started after it would both hold "the" lock."""
    import socket

    from sit_fast.errors import UserError
    from sit_fast import files
    from sit_fast.files import FileLock

    out = tmp_path / "fid.npz"
    holder = FileLock(str(out), "--out")
    holder.acquire()
    assert (tmp_path / ".fid.npz.lock").read_text() == f"process {os.getpid()} on {socket.gethostname()}\n"
    with pytest.raises(UserError) as err:
        FileLock(str(out), "--out").acquire()
    assert str(err.value) == (f"another job is writing {out} now (process {os.getpid()} on {socket.gethostname()}): "
                              f"wait for it to end, or pass another --out")
    real_open = os.open
    opened = []

    def holder_ends_after_this_open(path, *args):
        fd = real_open(path, *args)
        opened.append(path)
        if len(opened) == 1:
            holder.release()  # removes the file this job has just opened, then lets go of the lock
        return fd

    monkeypatch.setattr(files.os, "open", holder_ends_after_this_open)
    second = FileLock(str(out), "--out")
    second.acquire()
    monkeypatch.undo()
    assert len(opened) == 2  # the removed file's lock let go, the new file's taken
    assert os.fstat(second.fd).st_ino == os.stat(tmp_path / ".fid.npz.lock").st_ino
    with pytest.raises(UserError, match="another job is writing"):
        FileLock(str(out), "--out").acquire()
    second.release()
    assert os.listdir(tmp_path) == []


def test_a_job_that_opened_a_folder_lock_as_its_holder_removed_the_folder_is_refused(tmp_path, monkeypatch):
    """remove_locked_folder (a run that did not start, OUT.parts/ once used) removes the lock file, then the
    folder, holding the lock: a job that opened the lock file just before gets the lock of a removed file
    once the holder lets go. It is refused, in one line, not left holding a lock that a job started on
    the folder made again takes as well (both writing into it)."""
    from sit_fast import files
    from sit_fast.errors import UserError
    from sit_fast.files import FolderLock, remove_locked_folder

    folder = tmp_path / "out.parts"
    folder.mkdir()
    holder = FolderLock(str(folder), "--out")
    holder.acquire()
    (folder / "000000.pt").write_bytes(b"x")
    real_open = os.open

    def holder_ends_after_this_open(path, *args):
        fd = real_open(path, *args)
        if not os.path.exists(folder / "000000.pt") or holder.fd is None:
            return fd
        remove_locked_folder(str(folder))  # the file this job has just opened goes, then the lock
        holder.release()
        return fd

    monkeypatch.setattr(files.os, "open", holder_ends_after_this_open)
    late = FolderLock(str(folder), "--out")
    with pytest.raises(UserError) as err:
        late.acquire()
    monkeypatch.undo()
    assert str(err.value) == (f"--out {folder}: the job that held {folder / '.lock'} removed {folder} as it ended, "
                              f"as this job started on it: run this job again")
    assert late.fd is None and late not in FolderLock._held
    folder.mkdir()
    with FolderLock(str(folder), "--out") as lock:
        lock.acquire()
        assert lock.fd is not None


def test_a_folder_lock_whose_file_cannot_be_written_is_one_line_naming_it(tmp_path):
    from sit_fast.errors import UserError
    from sit_fast.files import FolderLock

    (tmp_path / ".lock").mkdir()  # opening it for writing fails, whoever runs the test
    with pytest.raises(UserError) as err:
        FolderLock(str(tmp_path), "--out").acquire()
    assert str(err.value) == (f"--out {tmp_path}: cannot write {tmp_path / '.lock'} (Is a directory): pass a folder "
                              f"that can be written")


@pytest.mark.parametrize("code", ["EINVAL", "ENOLCK"])
def test_a_folder_lock_on_a_filesystem_that_cannot_lock_warns_and_the_job_goes_on(tmp_path, monkeypatch, caplog,
                                                                                  code):
    import errno
    import fcntl

    from sit_fast.files import FolderLock

    def cannot_lock(fd, operation):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(fcntl, "flock", cannot_lock)
    open_files = len(os.listdir("/proc/self/fd"))
    with caplog.at_level(logging.WARNING, logger="sit_fast"):
        with FolderLock(str(tmp_path), "--out") as lock:
            lock.acquire()
            assert lock.fd is None and lock not in FolderLock._held
            assert len(os.listdir("/proc/self/fd")) == open_files
            FolderLock(str(tmp_path), "--out").acquire()  # a second job is not refused: it cannot be told
    path = tmp_path / ".lock"
    assert [r.getMessage() for r in caplog.records] == [
        f"cannot lock {path} ({os.strerror(getattr(errno, code))}): a second job started on {tmp_path} while this "
        f"one runs would not be noticed"] * 2
