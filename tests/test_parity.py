"""A ``spherinator-submit`` task is exactly ``spherinator fit`` on the same files: same model, data and optimizer.

For every model YAML in experiments/ and the seed's model snippets, the config a task trains with is compared with
the config ``spherinator fit`` builds from the same ``-c`` files, overrides and swept values, and the two models
are built: same modules, same parameters, same initial weights. The only differences allowed are the ones the
launcher lists (its ``changes``: Trainer size, run dir, loggers, checkpoints, requeue).
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from spherinator.cli import SpherinatorCLI, main
from spherinator.submit.compose import _flatten, compose_task
from spherinator.submit.resources import Resources
from spherinator.submit.sweep import Task, expand_sweep
from tests.test_experiments import MODEL_YAMLS, exp, model_args, test_overlay
from tests.test_seed import (
    AE_SNIPPET,
    CNN1D_VAE,
    DECODER_SNIPPET,
    ENCODER_SNIPPET,
    data_config,
    load,
    model_config,
    seed_vae_at_65,
    write,
)
from tests.test_seed import test_trainer as seed_trainer

# Sections the user writes and the launcher never touches.
USER_SECTIONS = ("model", "data", "optimizer", "lr_scheduler", "seed_everything")


def fit_config(args: list[str]) -> tuple[SpherinatorCLI, dict[str, Any]]:
    """What ``spherinator fit`` builds from ``args`` (the model too), as it saves it beside its logs."""
    cli = SpherinatorCLI(args=args, run=False)
    return cli, yaml.safe_load(cli.parser.dump(cli.config, skip_unset=False))


def task_config(tmp_path: Path, args: list[str], task: Task, resources: Resources | None = None) -> tuple:
    """The composed config of ``task`` for ``args`` (``-c`` files first), and the CLI the task itself builds."""
    configs = [args[i + 1] for i, a in enumerate(args) if a == "-c"]
    overrides = [a for i, a in enumerate(args) if a != "-c" and (i == 0 or args[i - 1] != "-c")]
    run_dir = tmp_path / "sweep" / task.name
    run_dir.mkdir(parents=True, exist_ok=True)
    composed = compose_task(configs, overrides, task, resources or Resources(), run_dir, task.name, validate=False)
    path = run_dir / "config.yaml"
    path.write_text(composed.text)
    return composed, yaml.safe_load(composed.text), path


def assert_same_model(fit_cli: SpherinatorCLI, task_cli: SpherinatorCLI) -> None:
    a, b = fit_cli.model, task_cli.model
    assert repr(a) == repr(b)  # the same modules, layer by layer, with their arguments
    assert sum(p.numel() for p in a.parameters()) == sum(p.numel() for p in b.parameters())
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:  # both seeded by seed_everything before building: the same initial weights
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


def assert_parity(tmp_path: Path, args: list[str], task: Task, resources: Resources | None = None) -> None:
    fit_cli, fit = fit_config([*args, *task.cli_args()])
    composed, task_dict, path = task_config(tmp_path, args, task, resources)
    for section in USER_SECTIONS:
        assert task_dict.get(section) == fit.get(section), section
    # Everything else that differs is in the launcher's own list of what it set.
    fit_leaves, task_leaves = _flatten(fit), _flatten(task_dict)
    differing = {k for k in fit_leaves.keys() | task_leaves.keys() if fit_leaves.get(k, ...) != task_leaves.get(k, ...)}
    listed = {line.split(":", 1)[0] for line in composed.changes}
    assert differing == listed
    assert all(key.startswith("trainer.") for key in listed), listed
    task_cli = SpherinatorCLI(args=["-c", str(path)], run=False)  # what the task builds from its config.yaml
    assert_same_model(fit_cli, task_cli)


@pytest.mark.parametrize("name", MODEL_YAMLS)
def test_every_model_yaml_composes_to_the_model_fit_builds(name, images128, spectra256, tiny_vit, tmp_path):
    extra, data = model_args(name, images128, spectra256, tiny_vit)
    args = ["-c", exp(name), "-c", exp("illustris_small.yaml"), "-c", test_overlay(tmp_path, data), *extra]
    assert_parity(tmp_path, args, Task(0, "run"))


def test_explicit_nulls_survive_composition(images128, tmp_path):
    """vae_cnn3.yaml's last decoder block says `norm: null`: the task has no BatchNorm2d there either."""
    args = ["-c", exp("vae_cnn3.yaml"), "-c", exp("demo.yaml"), "-c", test_overlay(tmp_path, images128)]
    _, task_dict, path = task_config(tmp_path, args, Task(0, "run"))
    last = task_dict["model"]["init_args"]["decoder"]["init_args"]["cnn_layers"][-1]["init_args"]
    assert "norm" in last and last["norm"] is None
    model = SpherinatorCLI(args=["-c", str(path)], run=False).model
    assert not isinstance(model.decoder.cnn[-1][-1], torch.nn.BatchNorm2d)
    assert isinstance(model.decoder.cnn[-1][-1], torch.nn.Sigmoid)


def test_a_sweep_with_overrides_on_two_nodes_is_fit_with_the_swept_values(images128, tmp_path):
    """The issue's case: vae_cnn3 + demo.yaml, --nodes 2, a z_dim x beta sweep and an inline override."""
    args = ["-c", exp("vae_cnn3.yaml"), "-c", exp("demo.yaml"), "-c", test_overlay(tmp_path, images128)]
    args += ["--model.init_args.encoder.init_args.output_dim", "64"]
    tasks = expand_sweep(["model.init_args.z_dim=3,8", "model.init_args.beta=1e-4,1e-3"], None)
    assert len(tasks) == 4
    for task in tasks:
        fit_cli, fit = fit_config([*args, *task.cli_args()])
        composed, task_dict, _ = task_config(tmp_path, args, task, Resources(nodes=2))
        for section in USER_SECTIONS:
            assert task_dict.get(section) == fit.get(section), (task.name, section)
        init = task_dict["model"]["init_args"]
        assert (init["z_dim"], init["beta"]) == (int(task.params["model.init_args.z_dim"]),
                                                 float(task.params["model.init_args.beta"]))  # fmt: skip
        assert init["encoder"]["init_args"]["output_dim"] == 64
        assert (task_dict["trainer"]["num_nodes"], task_dict["trainer"]["strategy"]) == (2, "ddp")
        assert "trainer.num_nodes: 1 -> 2" in composed.changes
        assert "trainer.strategy: 'auto' -> 'ddp'" in composed.changes
    # The callbacks of vae_cnn3.yaml and demo.yaml (appended across -c files) are all there, in order, plus the
    # requeue callback.
    names = [cb["class_path"].rsplit(".", 1)[1] for cb in task_dict["trainer"]["callbacks"]]
    assert names == [
        "SphereQuality", "ModelCheckpoint", "LogReconstructionCallback", "LogLatentSphere", "RequeueOnSignal"
    ]  # fmt: skip


def seed_models(image_dataset: Path, spectrum_dataset: Path) -> dict[str, tuple[dict, dict]]:
    """The seed's model snippets (as test_seed.py fills them) with the data they run on."""
    decoder = load(DECODER_SNIPPET)["decoder"]
    decoder["init_args"]["input_dim"] = 64
    decoder["init_args"]["cnn_input_dim"] = [64, 60, 60]
    decoder["init_args"]["cnn_layers"][0]["init_args"]["kernel_size"] = 4
    return {
        "vae_at_65": (seed_vae_at_65(), data_config(image_dataset, 65, num_workers=0)),
        "autoencoder": (
            model_config(AE_SNIPPET, load(ENCODER_SNIPPET)["encoder"], decoder),
            data_config(image_dataset, 128, num_workers=0),
        ),
        "cnn1d": (load(CNN1D_VAE), data_config(spectrum_dataset, None, num_workers=0)),
    }


@pytest.mark.parametrize("name", ["vae_at_65", "autoencoder", "cnn1d"])
def test_seed_snippets_compose_to_the_model_fit_builds(name, image_dataset, spectrum_dataset, tmp_path):
    model, data = seed_models(image_dataset, spectrum_dataset)[name]
    args = ["-c", write(tmp_path / "model.yaml", model), "-c", write(tmp_path / "data.yaml", data)]
    args += ["-c", write(tmp_path / "trainer.yaml", seed_trainer(default_root_dir=str(tmp_path)))]
    assert_parity(tmp_path, args, Task(0, "run"))


def test_print_config_agrees_with_the_task_except_for_sizes_it_leaves_to_inference(images128, tmp_path):
    """``spherinator fit --print_config`` shows the model the task trains; only inferred sizes may be unfilled."""
    args = ["-c", exp("vae_cnn3.yaml"), "-c", exp("demo.yaml"), "-c", test_overlay(tmp_path, images128)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["fit", *args, "--print_config"])
    printed = _flatten(yaml.safe_load(out.getvalue())["model"])
    _, task_dict, _ = task_config(tmp_path, args, Task(0, "run"))
    composed = _flatten(task_dict["model"])
    inferred = re.compile(r"(input_dim|output_dim|encoder_out_dim)$")
    for key, value in printed.items():
        if value is None and inferred.search(key):  # filled in from z_dim / the data: a number or a shape list
            assert composed.get(key) is not None or any(k.startswith(f"{key}[") for k in composed), key
        else:
            assert key in composed and composed[key] == value, (key, value, composed.get(key))


def test_a_swept_tasks_values_are_in_its_config_for_requeue_on_signal_and_listed(images128, tmp_path):
    """The swept values reach the task through its config.yaml (RequeueOnSignal's ``swept``, which logs them), not
    the sweep's manifest; they are listed among the launcher's additions, and the model is still fit's."""
    args = ["-c", exp("vae_cnn3.yaml"), "-c", exp("demo.yaml"), "-c", test_overlay(tmp_path, images128)]
    (task,) = expand_sweep(["model.init_args.beta=1e-3"], None)
    assert_parity(tmp_path, args, task)
    composed, task_dict, _ = task_config(tmp_path, args, task)
    (requeue,) = [cb for cb in task_dict["trainer"]["callbacks"] if cb["class_path"].endswith("RequeueOnSignal")]
    assert requeue["init_args"]["swept"] == {"model.init_args.beta": 0.001}
    assert any(line.startswith(f"trainer.callbacks[{len(task_dict['trainer']['callbacks']) - 1}].init_args.swept.")
               for line in composed.changes)  # fmt: skip
