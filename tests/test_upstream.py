"""Coming from upstream Spherinator (HITS-AIN/Spherinator, PyPI ``spherinator`` 0.5.1): its checkpoints convert to
ours with equal reconstructions, the VAE's Python API refuses upstream-style unpacking of our results, the sphere
head's centring is a choice, and the atlas reads ONNX exports without our metadata.

The proof against upstream's own package (slow) installs it from the package index into a venv of its own, cached
under the temp directory by version (``SPHERINATOR_UPSTREAM_PYTHON`` names an interpreter that has it already).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from spherinator.distributions import HypersphericalUniform, PowerSpherical
from spherinator.models import (
    ConsecutiveConv2DLayer,
    ConsecutiveConvTranspose2DLayer,
    ConvolutionalDecoder2D,
    ConvolutionalEncoder2D,
    UpsamplingDecoder2D,
    VariationalAutoencoder,
)

UPSTREAM_VERSION = "0.5.1"
MAKE_RUNS = Path(__file__).parent / "upstream_side" / "make_upstream_runs.py"


def tiny_vae(centre: bool = True, seed_norm: bool = False) -> VariationalAutoencoder:
    torch.manual_seed(0)
    encoder = ConvolutionalEncoder2D(
        input_dim=[2, 8, 8], output_dim=6, cnn_layers=[ConsecutiveConv2DLayer(out_channels=[4], stride=2, padding=1)]
    )
    decoder = ConvolutionalDecoder2D(
        cnn_input_dim=[4, 4, 4],
        cnn_layers=[ConsecutiveConvTranspose2DLayer(out_channels=[2], kernel_size=4, stride=2, padding=1)],
        seed_norm=seed_norm,
    )
    return VariationalAutoencoder(encoder, decoder, z_dim=3, centre=centre)


# --- the Python API: upstream's calls give upstream's values or fail loudly -------------------------------------


@pytest.mark.parametrize("batch", [4, 2])
def test_upstream_style_unpacking_of_forward_and_encode_raises_at_any_batch_size(batch):
    model = tiny_vae().eval()
    x = torch.rand(batch, 2, 8, 8)
    with pytest.raises(TypeError, match="forward_sampled"):
        (loc, scale), (q_z, p_z), z, recon = model(x)  # at batch 4 this used to split the batch silently
    with pytest.raises(TypeError, match="encode_posterior"):
        loc, scale = model.encode(x)  # at batch 2 likewise
    # the results themselves stay tensors of ours: arithmetic, rows, and every derived tensor iterate as usual
    assert model(x).shape == x.shape and model.encode(x).shape == (batch, 3)
    assert len(list(model.encode(x).float())) == batch and len(list(zip(x, model(x).cpu(), strict=True))) == batch
    torch.testing.assert_close(model.reconstruct(x), model(x), rtol=0, atol=0)


def test_results_of_encode_and_forward_deepcopy_and_save_as_plain_tensors(tmp_path):
    import copy

    model = tiny_vae().eval()
    x = torch.rand(4, 2, 8, 8)
    with torch.no_grad():
        location, reconstruction = model.encode(x), model(x)
    copied = copy.deepcopy({"z": location})["z"]  # torch's default deepcopy of a subclass used to raise
    assert type(copied) is torch.Tensor and torch.equal(copied, location)
    torch.save({"z": location, "x_hat": reconstruction}, tmp_path / "out.pt")
    loaded = torch.load(tmp_path / "out.pt")  # weights-only by default: it used to refuse the subclass
    assert all(type(v) is torch.Tensor for v in loaded.values()) and torch.equal(loaded["z"], location)


@pytest.mark.parametrize("batch", [4, 2])
def test_forward_sampled_encode_posterior_and_reparameterize_have_upstreams_shapes(batch):
    model = tiny_vae().eval()
    x = torch.rand(batch, 2, 8, 8)
    (loc, scale), (q_z, p_z), z, recon = model.forward_sampled(x)
    assert loc.shape == (batch, 3) and scale.shape == (batch, 1)  # upstream's concentration is (B, 1)
    assert isinstance(q_z, PowerSpherical) and isinstance(p_z, HypersphericalUniform)
    assert z.shape == (batch, 3) and recon.shape == x.shape
    torch.testing.assert_close(z.norm(dim=1), torch.ones(batch))
    location, concentration = model.encode_posterior(x)
    torch.testing.assert_close(location, model.encode(x), rtol=0, atol=0)
    torch.testing.assert_close(concentration, model.encoder(x)[1][:, None], rtol=0, atol=0)
    q, _ = model.reparameterize(location, concentration)
    torch.testing.assert_close(q.loc, location)


# --- batch centring of the sphere head is a choice -----------------------------------------------------------------


def test_a_head_without_centring_is_upstreams_plain_direction_and_has_no_centre_keys():
    model = tiny_vae(centre=False).train()
    assert not any(".centre." in key for key in model.state_dict())
    x = torch.rand(16, 2, 8, 8)
    expected = nn.functional.normalize(model.encoder.fc_location(model.encoder.encoder(x)), dim=-1)
    torch.testing.assert_close(model.encoder(x)[0], expected)
    # a checkpoint of a model without centring loads strictly into one (the older-state hook adds nothing)
    again = tiny_vae(centre=False)
    again.load_state_dict(model.state_dict())
    assert "centre" in VariationalAutoencoder.__init__.__code__.co_varnames


# --- decoders gain upstream's seed BatchNorm + ReLU and channel floor ----------------------------------------------


def test_seed_norm_puts_batchnorm_and_relu_after_the_seed_projection():
    decoder = tiny_vae(seed_norm=True).decoder.eval()
    assert isinstance(decoder.seed_block[0], nn.BatchNorm2d) and isinstance(decoder.seed_block[1], nn.ReLU)
    z = torch.randn(3, 3)
    seed = decoder.seed_block(decoder.unflatten(decoder.fc(z)))
    torch.testing.assert_close(decoder(z), decoder.cnn(seed))
    assert tiny_vae().decoder.seed_block is None  # off by default: earlier checkpoints keep their keys


def test_upsampling_decoder_floors_its_channels_at_min_channels():
    floored = UpsamplingDecoder2D(input_dim=3, output_dim=[3, 32, 32], base_channels=64, seed_size=4, min_channels=32)
    plain = UpsamplingDecoder2D(input_dim=3, output_dim=[3, 32, 32], base_channels=64, seed_size=4)
    assert [b[1].out_channels for b in floored.blocks] == [32, 32, 32]
    assert [b[1].out_channels for b in plain.blocks] == [32, 16, 8]
    assert floored(torch.randn(2, 3)).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="min_channels"):
        UpsamplingDecoder2D(input_dim=3, output_dim=[3, 32, 32], min_channels=0)


# --- the converter's refusals ---------------------------------------------------------------------------------------


def test_convert_upstream_names_a_missing_checkpoint_in_one_line(tmp_path, capsys):
    from spherinator.commands import main

    config = tmp_path / "cli-config.yaml"
    config.write_text("model:\n  class_path: spherinator.models.VariationalAutoencoder\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["convert-upstream", str(tmp_path / "nope.ckpt"), "-c", str(config), "-o", str(tmp_path / "o.ckpt")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spherinator convert-upstream: error:") and "nope.ckpt" in err and "\n" not in err
    assert not (tmp_path / "o.ckpt").exists()


def test_convert_upstream_refuses_a_checkpoint_of_ours(tmp_path):
    from spherinator.errors import CheckpointError
    from spherinator.upstream import convert_upstream

    ckpt = tmp_path / "ours.ckpt"
    torch.save({"state_dict": tiny_vae().state_dict()}, ckpt)
    config = tmp_path / "cli-config.yaml"
    config.write_text("model:\n  class_path: spherinator.models.VariationalAutoencoder\n")
    with pytest.raises(CheckpointError, match="spherinator checkpoint already"):
        convert_upstream(ckpt, config, tmp_path / "out.ckpt")


def _mlp_upstream_run(directory: Path) -> tuple[Path, Path]:
    """A minimal upstream run (MLP encoder and decoder, whose keys upstream and ours share): checkpoint, config."""
    directory.mkdir(parents=True, exist_ok=True)
    mlp = "spherinator.models.MLP"
    config = directory / "cli-config.yaml"
    config.write_text(
        "model:\n  class_path: spherinator.models.VariationalAutoencoder\n  init_args:\n"
        f"    encoder: {{class_path: {mlp}, init_args: {{input_size: 4, hidden_sizes: [], output_size: 6}}}}\n"
        f"    decoder: {{class_path: {mlp}, init_args: {{input_size: 3, hidden_sizes: [], output_size: 4}}}}\n"
        "    encoder_out_dim: 6\n    z_dim: 3\n"
    )
    state = {"encoder.model.1.weight": torch.randn(6, 4), "encoder.model.1.bias": torch.randn(6),
             "variational_encoder.fc_location.weight": torch.randn(3, 6), "variational_encoder.fc_location.bias":
             torch.randn(3), "variational_encoder.fc_scale.weight": torch.randn(1, 6),
             "variational_encoder.fc_scale.bias": torch.randn(1), "decoder.model.1.weight": torch.randn(4, 3),
             "decoder.model.1.bias": torch.randn(4)}  # fmt: skip
    checkpoint = directory / "upstream.ckpt"
    torch.save({"state_dict": state, "epoch": 1, "global_step": 2}, checkpoint)
    return checkpoint, config


@pytest.mark.parametrize("output", ["upstream.ckpt", "cli-config.ckpt", "converted.yaml", "."])
def test_convert_upstream_never_writes_over_its_inputs_or_its_own_checkpoint(tmp_path, output):
    from spherinator.errors import OutputError
    from spherinator.upstream import convert_upstream

    checkpoint, config = _mlp_upstream_run(tmp_path / "run")
    before = {p.name: p.read_bytes() for p in (checkpoint, config)}
    with pytest.raises(OutputError, match="input of this conversion|config's place|is a directory"):
        convert_upstream(checkpoint, config, tmp_path / "run" / output, overwrite=True)
    assert {p.name: p.read_bytes() for p in (checkpoint, config)} == before
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["cli-config.yaml", "upstream.ckpt"]


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        ("    max_scale: big\n", "max_scale 'big'"),
        (None, "has no encoder or decoder"),
        ("  init_args: [1, 2]\n", "not a mapping"),
    ],
)
def test_convert_upstream_names_a_bad_model_section_in_one_line(tmp_path, capsys, edit, named):
    from spherinator.commands import main

    checkpoint, config = _mlp_upstream_run(tmp_path / "run")
    text = config.read_text()
    if edit is None:  # an init_args without the encoder and decoder
        text = "model:\n  class_path: spherinator.models.VariationalAutoencoder\n  init_args: {z_dim: 3}\n"
    elif edit.startswith("    "):
        text += edit
    else:
        text = "model:\n  class_path: spherinator.models.VariationalAutoencoder\n" + edit
    config.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main(["convert-upstream", str(checkpoint), "-c", str(config), "-o", str(tmp_path / "out.ckpt")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and named in err and "\n" not in err
    assert not (tmp_path / "out.ckpt").exists()


def test_convert_upstream_keeps_fixed_scale_so_training_on_keeps_the_concentration(tmp_path):
    from spherinator.export import load_model
    from spherinator.upstream import convert_upstream

    checkpoint, config = _mlp_upstream_run(tmp_path / "run")
    config.write_text(config.read_text() + "    fixed_scale: 0.5\n")
    ckpt = torch.load(checkpoint, weights_only=True)  # as upstream 0.5.1 saves a fixed_scale run's head
    ckpt["state_dict"]["variational_encoder.fc_scale.weight"].zero_()
    ckpt["state_dict"]["variational_encoder.fc_scale.bias"].fill_(0.5)
    torch.save(ckpt, checkpoint)
    converted = convert_upstream(checkpoint, config, tmp_path / "ours.ckpt")
    assert converted.hyper_parameters["fixed_scale"] == 0.5
    head = load_model(converted.path).model.encoder.fc_scale
    assert not any(p.requires_grad for p in head.parameters())  # fit --ckpt_path does not learn it
    assert head.bias.item() == 0.5 and not head.weight.any()


def test_convert_upstream_names_a_full_disk_in_one_line(tmp_path, monkeypatch):
    import errno

    import spherinator.upstream as upstream
    from spherinator.errors import OutputError

    checkpoint, config = _mlp_upstream_run(tmp_path / "run")
    converted = upstream.convert_upstream(checkpoint, config, tmp_path / "ok.ckpt")  # the run converts
    assert converted.path.is_file() and converted.config.is_file()
    save = torch.save

    def full_disk_save(obj, f, *args, **kwargs):  # torch.save to a file on a full disk raises a RuntimeError
        if isinstance(f, (str, Path)):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64000 vs 63888")
        return save(obj, f, *args, **kwargs)

    def full_disk_write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk_save)
    monkeypatch.setattr(Path, "write_bytes", full_disk_write)
    with pytest.raises(OutputError, match="No space left on device"):
        upstream.convert_upstream(checkpoint, config, tmp_path / "full" / "out.ckpt")
    assert list((tmp_path / "full").iterdir()) == []


# --- ONNX exports without our metadata ------------------------------------------------------------------------------


def _plain_onnx_export(directory: Path, z_dim: int = 3, shape: tuple[int, ...] = (1, 4, 4)) -> None:
    """An encoder.onnx/decoder.onnx pair as upstream 0.5.1 writes them: no metadata, inputs both named ``x``, a
    dynamic batch axis, and an encoder with two outputs (location, scale (B, 1))."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    size = int(np.prod(shape))

    def save(nodes, inits, inputs, outputs, name):
        graph = helper.make_graph(nodes, name, inputs, outputs, [numpy_helper.from_array(a, n) for n, a in inits])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        onnx.checker.check_model(model)
        onnx.save(model, str(directory / f"{name}.onnx"))

    directory.mkdir(parents=True)
    save([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Reshape", ["h", "s"], ["out"])],
         [("w", rng.normal(size=(z_dim, size)).astype(np.float32)), ("s", np.array([-1, *shape], np.int64))],
         [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", z_dim])],
         [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", *shape])], "decoder")  # fmt: skip
    save([helper.make_node("Reshape", ["x", "s"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["h"]),
          helper.make_node("LpNormalization", ["h"], ["location"], axis=1, p=2),
          helper.make_node("MatMul", ["flat", "v"], ["g"]), helper.make_node("Softplus", ["g"], ["scale"])],
         [("s", np.array([-1, size], np.int64)), ("w", rng.normal(size=(size, z_dim)).astype(np.float32)),
          ("v", rng.normal(size=(size, 1)).astype(np.float32))],
         [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *shape])],
         [helper.make_tensor_value_info("location", TensorProto.FLOAT, ["batch", z_dim]),
          helper.make_tensor_value_info("scale", TensorProto.FLOAT, ["batch", 1])], "encoder")  # fmt: skip


def test_atlas_opens_an_onnx_export_without_metadata_from_its_graph(tmp_path):
    from spherinator.atlas import open_model

    _plain_onnx_export(tmp_path / "onnx")
    model = open_model(tmp_path / "onnx", device="cpu")
    assert (model.z_dim, model.input_shape) == (3, (1, 4, 4))
    out = model.encode(torch.rand(5, 1, 4, 4))
    assert out["location"].shape == (5, 3) and out["scale"].shape == (5,)
    np.testing.assert_allclose(np.linalg.norm(out["location"], axis=1), 1.0, rtol=1e-5)
    assert model.decode(out["location"]).shape == (5, 1, 4, 4)


def test_atlas_names_a_metadata_free_decoder_whose_latent_size_is_not_fixed(tmp_path):
    import onnx

    from spherinator.atlas import AtlasError, open_model

    _plain_onnx_export(tmp_path / "onnx")
    graph = onnx.load(str(tmp_path / "onnx" / "decoder.onnx"))
    graph.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "z"  # (batch, z): no fixed latent size
    onnx.save(graph, str(tmp_path / "onnx" / "decoder.onnx"))
    with pytest.raises(AtlasError, match="no spherinator metadata"):
        open_model(tmp_path / "onnx", device="cpu")


# --- the proof against upstream's own package (slow: a venv with upstream's package) -------------------------------


def _upstream_python() -> Path:
    """An interpreter with upstream's package: $SPHERINATOR_UPSTREAM_PYTHON, else a venv cached by version under the
    temp directory (made once: upstream's wheel without its Python check, then its dependencies for this Python)."""
    given = os.environ.get("SPHERINATOR_UPSTREAM_PYTHON")
    if given:
        return Path(given)
    venv = Path(tempfile.gettempdir()) / "spherinator-test-cache" / f"upstream-venv-{UPSTREAM_VERSION}"
    python = venv / "bin" / "python"
    if (venv / "ready").exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--prefer-binary"]
    # Only upstream's own wheel skips the Python check (it asks for 3.12); its dependencies are resolved for this
    # Python, where skipping the check for all of them picked numpy 2.5 and tifffile releases that need 3.12.
    install = subprocess.run(pip + ["--no-deps", "--ignore-requires-python", f"spherinator=={UPSTREAM_VERSION}"],
                             capture_output=True, text=True, timeout=3600)  # fmt: skip
    if install.returncode == 0:
        requires = subprocess.run(
            [str(python), "-c", "import importlib.metadata as m; print('\\n'.join(m.requires('spherinator') or []))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
        wanted = [line for line in requires if line.strip() and "extra ==" not in line]
        install = subprocess.run(pip + wanted + ["power-spherical"], capture_output=True, text=True, timeout=3600)
    if install.returncode != 0:
        text = install.stderr + install.stdout
        unreachable = ("No matching distribution", "Could not find a version", "Failed to establish", "No route")
        if any(marker in text for marker in unreachable):
            pytest.skip(f"upstream spherinator=={UPSTREAM_VERSION} cannot be installed (package index unreachable)")
        raise AssertionError(f"installing upstream spherinator failed:\n{text[-3000:]}")
    (venv / "ready").touch()
    return python


@pytest.fixture(scope="module")
def upstream_runs(tmp_path_factory) -> Path:
    """Tiny upstream runs made by upstream's own LightningCLI: checkpoint, saved config, expected outputs."""
    python = _upstream_python()
    out = tmp_path_factory.mktemp("upstream_runs")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # upstream's package, never ours
    made = subprocess.run([str(python), str(MAKE_RUNS), str(out)], cwd=out, env=env, capture_output=True, text=True,
                          timeout=1200)  # fmt: skip
    assert made.returncode == 0, made.stderr[-4000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["conv2d", "upsampling", "conv1d"])
def test_an_upstream_checkpoint_converts_and_reconstructs_as_upstream(upstream_runs, name, tmp_path):
    from spherinator.export import load_model
    from spherinator.upstream import convert_upstream

    run = upstream_runs / name
    converted = convert_upstream(run / "upstream.ckpt", run / "cli-config.yaml", tmp_path / "ours.ckpt")
    expected = torch.load(run / "expected.pt")
    model = load_model(converted.path).model  # as export/evaluate/atlas load it: the checkpoint alone
    with torch.no_grad():
        torch.testing.assert_close(model.reconstruct(expected["x"]), expected["reconstruction"], rtol=0, atol=1e-5)
        location, scale = model.encode_posterior(expected["x"])
    torch.testing.assert_close(location, expected["location"], rtol=0, atol=1e-5)
    torch.testing.assert_close(scale, expected["scale"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_converted_checkpoint_exports_and_trains_on(upstream_runs, tmp_path, image_dataset, monkeypatch):
    from spherinator.commands import main

    monkeypatch.chdir(tmp_path)  # fit's runs/ folder
    from spherinator.upstream import convert_upstream

    run = upstream_runs / "conv2d"
    converted = convert_upstream(run / "upstream.ckpt", run / "cli-config.yaml", tmp_path / "ours.ckpt")
    ckpt = converted.path
    main(["export", str(ckpt), "-o", str(tmp_path / "onnx"), "--batch_sizes", "1", "3"])
    assert (tmp_path / "onnx" / "decoder.onnx").is_file()
    data = tmp_path / "data.yaml"
    data.write_text(
        "data:\n  class_path: spherinator.data.DataModule\n  init_args:\n"
        f"    path: {image_dataset}\n    batch_size: 16\n    num_workers: 0\n"
    )
    # one more epoch from the converted run (it ran 2 upstream), with the model config written beside it
    main(["fit", "-c", str(converted.config), "-c", str(data), "--trainer.max_epochs", "3",
          "--trainer.accelerator", "cpu", "--ckpt_path", str(ckpt)])  # fmt: skip
    (last,) = (tmp_path / "runs").rglob("*.ckpt")
    resumed = torch.load(last, weights_only=True)
    assert resumed["epoch"] == 2 and resumed["global_step"] > torch.load(ckpt, weights_only=True)["global_step"]


@pytest.mark.slow
def test_the_atlas_opens_upstreams_own_onnx_export(upstream_runs):
    from spherinator.atlas import open_model

    run = upstream_runs / "conv2d"
    if not (run / "onnx").is_dir():
        pytest.fail(f"upstream's export_onnx failed: {(run / 'onnx_error.txt').read_text()}")
    model = open_model(run / "onnx", device="cpu")
    assert (model.z_dim, model.input_shape) == (3, (3, 32, 32))
    expected = torch.load(run / "expected.pt")
    out = model.encode(expected["x"])
    np.testing.assert_allclose(out["location"], expected["location"].numpy(), atol=1e-5)
