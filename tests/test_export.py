"""ONNX export: three graphs with dynamic batch, metadata, validation against torch, CLI, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml

import spherinator
from spherinator import models
from spherinator.commands import main
from spherinator.export import ExportError, ValidationError, export_onnx

GRAPHS = {"encoder": ("x", "z"), "decoder": ("z", "x_hat"), "reconstruction": ("x", "x_hat")}
TINY = str(Path(__file__).parent / "configs" / "vae_tiny.yaml")


def fit_and_save(model: L.LightningModule, sample_shape: tuple[int, ...], path: Path) -> Path:
    """One training step on random data (so BatchNorm statistics and weights move), then a checkpoint."""
    data = torch.utils.data.DataLoader(torch.rand(8, *sample_shape), batch_size=4)
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, data)
    trainer.save_checkpoint(path)
    return path


def cnn2d_vae() -> models.VariationalAutoencoder:
    encoder = models.ConvolutionalEncoder2D(
        input_dim=[3, 32, 32],
        output_dim=16,
        cnn_layers=[models.ConsecutiveConv2DLayer(kernel_size=4, stride=2, padding=1, out_channels=[8, 16])],
    )
    decoder = models.ConvolutionalDecoder2D(
        cnn_input_dim=[16, 8, 8],
        cnn_layers=[
            models.ConsecutiveConvTranspose2DLayer(kernel_size=4, stride=2, padding=1, out_channels=[8]),
            models.ConsecutiveConvTranspose2DLayer(
                kernel_size=4, stride=2, padding=1, out_channels=[3], activation=torch.nn.Sigmoid, norm=None
            ),
        ],
    )
    return models.VariationalAutoencoder(encoder, decoder, z_dim=3)


AE_1D_CONFIG = {
    "class_path": "spherinator.models.Autoencoder",
    "init_args": {
        "encoder": {
            "class_path": "spherinator.models.ConvolutionalEncoder1D",
            "init_args": {
                "input_dim": [1, 64],
                "output_dim": 5,
                "cnn_layers": [
                    {
                        "class_path": "spherinator.models.ConsecutiveConv1DLayer",
                        "init_args": {"kernel_size": 4, "stride": 2, "padding": 1, "out_channels": [4, 8]},
                    }
                ],
            },
        },
        "decoder": {
            "class_path": "spherinator.models.ConvolutionalDecoder1D",
            "init_args": {
                "cnn_input_dim": [8, 16],
                "cnn_layers": [
                    {
                        "class_path": "spherinator.models.ConsecutiveConvTranspose1DLayer",
                        "init_args": {"kernel_size": 4, "stride": 2, "padding": 1, "out_channels": [4, 1]},
                    }
                ],
            },
        },
    },
}


def ae_1d(cls: type[models.Autoencoder] = models.Autoencoder) -> models.Autoencoder:
    """The model AE_1D_CONFIG describes, built in Python (``cls`` may be a test subclass)."""
    encoder = models.ConvolutionalEncoder1D(
        input_dim=[1, 64],
        output_dim=5,
        cnn_layers=[models.ConsecutiveConv1DLayer(kernel_size=4, stride=2, padding=1, out_channels=[4, 8])],
    )
    decoder = models.ConvolutionalDecoder1D(
        cnn_input_dim=[8, 16],
        cnn_layers=[models.ConsecutiveConvTranspose1DLayer(kernel_size=4, stride=2, padding=1, out_channels=[4, 1])],
    )
    return cls(encoder, decoder)


def config_for(tmp_path: Path, cls: type, name: str = "config.yaml") -> Path:
    """A run config building the AE_1D_CONFIG architecture as class ``cls``."""
    model = {**AE_1D_CONFIG, "class_path": f"{cls.__module__}.{cls.__qualname__}"}
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"model": model}))
    return path


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.fixture(scope="module")
def vae_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fit_and_save(cnn2d_vae(), (3, 32, 32), tmp_path_factory.mktemp("vae") / "vae.ckpt")


@pytest.fixture(scope="module")
def vae_export(vae_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """The VAE exported from its checkpoint alone, traced at batch 1 (the batch axis must still be dynamic)."""
    out = tmp_path_factory.mktemp("vae-export") / "onnx"
    return export_onnx(vae_checkpoint, out, trace_batch_size=1, trust=True), out


@pytest.fixture(scope="module")
def vae_torch(vae_checkpoint: Path) -> models.VariationalAutoencoder:
    """The same checkpoint loaded by Lightning itself: the reference the ONNX files must reproduce."""
    return models.VariationalAutoencoder.load_from_checkpoint(
        vae_checkpoint, map_location="cpu", weights_only=False
    ).eval()


def test_three_single_file_graphs_with_named_dynamic_inputs(vae_export):
    _, out = vae_export
    assert sorted(p.name for p in out.iterdir()) == [
        "decoder.onnx", "encoder.onnx", "export_report.json", "reconstruction.onnx",
    ]  # fmt: skip
    for graph, (input_name, output_name) in GRAPHS.items():
        sess = session(out / f"{graph}.onnx")
        (inp,) = sess.get_inputs()
        assert inp.name == input_name
        assert isinstance(inp.shape[0], str), f"{graph}: batch axis is fixed ({inp.shape})"
        assert [o.name for o in sess.get_outputs()] == [output_name]
        assert onnx.load(str(out / f"{graph}.onnx")).opset_import[0].version >= 18


def test_onnx_reproduces_lightning_model_at_other_batch_sizes(vae_export, vae_torch):
    _, out = vae_export
    encoder, decoder, recon = (session(out / f"{g}.onnx") for g in GRAPHS)
    for batch in (3, 33):  # neither the trace batch nor a validated one
        x = torch.rand(batch, 3, 32, 32)
        with torch.no_grad():
            z_torch, x_hat_torch = vae_torch.encode(x), vae_torch(x)
        (z,) = encoder.run(None, {"x": x.numpy()})
        (x_hat,) = recon.run(None, {"x": x.numpy()})
        (decoded,) = decoder.run(None, {"z": z})
        np.testing.assert_allclose(z, z_torch.numpy(), atol=1e-5, rtol=1e-3)
        np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)  # on the sphere
        np.testing.assert_allclose(x_hat, x_hat_torch.numpy(), atol=1e-5, rtol=1e-3)
        np.testing.assert_allclose(decoded, x_hat, atol=1e-5, rtol=1e-3)


def test_metadata_and_report(vae_export, vae_checkpoint):
    assert spherinator.export_onnx is export_onnx  # the seed's entry point
    report, out = vae_export
    for graph in GRAPHS:
        meta = metadata(out / f"{graph}.onnx")
        assert meta["graph"] == graph
        assert meta["z_dim"] == "3"
        assert json.loads(meta["input_shape"]) == [3, 32, 32]
        assert meta["spherinator_version"] == spherinator.__version__
        training = yaml.safe_load(meta["training_config"])
        assert training["model"]["class_path"] == "spherinator.models.VariationalAutoencoder"
        assert training["model"]["init_args"]["z_dim"] == 3
    on_disk = json.loads((out / "export_report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert on_disk["passed"] is True
    assert on_disk["checkpoint"] == str(vae_checkpoint.resolve())
    for graph in GRAPHS:
        batches = on_disk["graphs"][graph]["validation"]["batches"]
        assert [b["batch_size"] for b in batches] == [1, 7, 64]
        assert all(b["passed"] and b["max_abs_diff"] < 1e-5 for b in batches)


def test_autoencoder_1d_exports_its_code(tmp_path):
    model = ae_1d()
    ckpt = fit_and_save(model, (1, 64), tmp_path / "ae.ckpt")
    report = export_onnx(ckpt, tmp_path / "onnx", batch_sizes=(1, 5), trust=True)
    assert report["passed"] and report["model_class"] == "spherinator.models.Autoencoder"
    assert metadata(tmp_path / "onnx" / "decoder.onnx")["z_dim"] == "5"
    x = torch.rand(4, 1, 64)
    (code,) = session(tmp_path / "onnx" / "encoder.onnx").run(None, {"x": x.numpy()})
    model.eval()
    with torch.no_grad():
        np.testing.assert_allclose(code, model.encode(x).numpy(), atol=1e-5, rtol=1e-3)
        (x_hat,) = session(tmp_path / "onnx" / "reconstruction.onnx").run(None, {"x": x.numpy()})
        np.testing.assert_allclose(x_hat, model(x).numpy(), atol=1e-5, rtol=1e-3)
    assert x_hat.shape == (4, 1, 64)


def test_vit_encoder_with_upsampling_decoder(tmp_path):
    from transformers import ViTConfig, ViTModel

    vit_config = ViTConfig(
        image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32,
    )  # fmt: skip
    ViTModel(vit_config, add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    encoder = models.HuggingFaceViTEncoder(str(tmp_path / "vit"), output_dim=8)
    model = models.VariationalAutoencoder(encoder, models.UpsamplingDecoder2D(base_channels=8, seed_size=4), z_dim=3)
    ckpt = fit_and_save(model, (3, 16, 16), tmp_path / "vit.ckpt")
    report = export_onnx(ckpt, tmp_path / "onnx", trust=True)
    assert report["passed"] is True
    assert report["input_shape"] == [3, 16, 16]
    worst = max(b["max_abs_diff"] for g in report["graphs"].values() for b in g["validation"]["batches"])
    assert worst < 1e-5


@pytest.fixture(scope="module")
def cli_run(image_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 'spherinator fit' run on the tiny images: (checkpoint, saved config.yaml)."""
    root = tmp_path_factory.mktemp("cli-run")
    data = root / "data.yaml"
    data_args = {"path": str(image_dataset), "batch_size": 32, "num_workers": 0}
    data.write_text(yaml.safe_dump({"data": {"class_path": "spherinator.data.DataModule", "init_args": data_args}}))
    logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(root)}}
    main(["fit", "-c", TINY, "-c", str(data), "--trainer.max_steps", "1", f"--trainer.logger={json.dumps(logger)}"])
    (ckpt,) = root.rglob("*.ckpt")
    (config,) = root.rglob("config.yaml")
    return ckpt, config


def test_cli_exports_from_checkpoint_alone_and_with_config(cli_run, tmp_path, capsys):
    ckpt, config = cli_run
    main(["export", str(ckpt), "-o", str(tmp_path / "alone")])
    lines = capsys.readouterr().out.splitlines()
    for graph in GRAPHS:
        (line,) = [ln for ln in lines if ln.startswith(f"{graph}.onnx:")]
        assert "exported in" in line and "matches torch at batch 1, 7, 64" in line
    main(["export", str(ckpt), "--config", str(config), "--export_path", str(tmp_path / "with-config")])
    assert metadata(tmp_path / "with-config" / "encoder.onnx")["training_config"] == config.read_text()
    x = np.random.default_rng(0).random((6, 3, 32, 32), dtype=np.float32)
    (z_alone,) = session(tmp_path / "alone" / "encoder.onnx").run(None, {"x": x})
    (z_config,) = session(tmp_path / "with-config" / "encoder.onnx").run(None, {"x": x})
    np.testing.assert_allclose(z_alone, z_config, atol=1e-6)


def test_checkpoint_that_does_not_match_config(cli_run, tmp_path):
    ckpt, config = cli_run
    changed = yaml.safe_load(config.read_text())
    changed["model"]["init_args"]["encoder"]["init_args"]["output_dim"] = 24
    changed["model"]["init_args"]["encoder_out_dim"] = 24
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(changed))
    with pytest.raises(ExportError, match=r"does not match the model built from config .*shape checkpoint vs model"):
        export_onnx(ckpt, tmp_path / "onnx", config=other)
    assert not (tmp_path / "onnx").exists()

    changed["model"]["class_path"] = "spherinator.models.Autoencoder"
    other.write_text(yaml.safe_dump(changed))
    with pytest.raises(ExportError, match=r"trained as spherinator.models.VariationalAutoencoder but config"):
        export_onnx(ckpt, tmp_path / "onnx", config=other)


def test_bad_checkpoint_files(tmp_path):
    with pytest.raises(ExportError, match=r"'.*missing.ckpt' does not exist"):
        export_onnx(tmp_path / "missing.ckpt", tmp_path / "onnx")
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(ExportError, match=r"is not a PyTorch checkpoint"):
        export_onnx(text, tmp_path / "onnx")
    weights = tmp_path / "weights.pt"
    torch.save({"weight": torch.ones(2)}, weights)
    with pytest.raises(ExportError, match=r"not a Lightning checkpoint \(no 'state_dict'; found: \['weight'\]\)"):
        export_onnx(weights, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


class RunsOnLoad:
    """Pickles to a call of Path.write_text: unpickling it in full writes ``marker`` (what a crafted .ckpt does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "ran")


def test_checkpoint_with_code_is_refused_unless_trusted(tmp_path, capsys):
    marker = tmp_path / "marker"
    crafted = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"encoder": RunsOnLoad(marker)}}, crafted)
    # a full unpickle runs the file's code before any check could refuse it: the export must not do one
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(crafted), "-o", str(tmp_path / "onnx")])
    assert exit_info.value.code == 2  # a user error, as in every other command
    (line,) = capsys.readouterr().err.splitlines()
    assert "--trust-checkpoint" in line and "built in Python stores its encoder/decoder modules" in line
    assert not marker.exists()
    with pytest.raises(ExportError, match=r"stores 'getattr' beyond tensors .*trust=True in export_onnx"):
        export_onnx(crafted, tmp_path / "onnx")
    assert not marker.exists() and not (tmp_path / "onnx").exists()
    # trusted, the file is read in full (its code runs) and the export goes on to its next check
    with pytest.raises(SystemExit):
        main(["export", str(crafted), "-o", str(tmp_path / "onnx"), "--trust-checkpoint"])
    assert marker.read_text() == "ran"
    assert "match 0 spherinator model classes" in capsys.readouterr().err


def test_python_built_checkpoint_needs_trust(vae_checkpoint, tmp_path):
    with pytest.raises(ExportError, match=r"stores 'spherinator\.models\..*Encoder2D' .*--trust-checkpoint"):
        export_onnx(vae_checkpoint, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


def test_cli_checkpoint_loads_weights_only(cli_run, monkeypatch):
    from spherinator.export.checkpoint import load_model

    ckpt, _ = cli_run
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: loads.append(kw.get("weights_only")) or real_load(*a, **kw))
    loaded = load_model(ckpt, trust=True)  # trusting changes nothing for a file that needs no full unpickle
    assert loads == [True]
    assert loaded.class_path == "spherinator.models.VariationalAutoencoder"


def test_existing_export_path_needs_overwrite(vae_checkpoint, vae_export, tmp_path):
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "encoder.onnx").write_bytes(b"old")
    (out / "README.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"already exists and is not empty .*encoder.onnx.*overwrite"):
        export_onnx(vae_checkpoint, out, trust=True)
    assert (out / "encoder.onnx").read_bytes() == b"old"
    export_onnx(vae_checkpoint, out, overwrite=True, validate=False, trust=True)
    assert (out / "encoder.onnx").read_bytes() == (vae_export[1] / "encoder.onnx").read_bytes()
    assert (out / "README.txt").read_text() == "mine"  # files that are not ours stay
    assert json.loads((out / "export_report.json").read_text())["passed"] is None


def test_bad_arguments(vae_checkpoint, tmp_path):
    with pytest.raises(ExportError, match=r"opset 17 is not supported: choose 18\.\."):
        export_onnx(vae_checkpoint, tmp_path / "onnx", opset=17)
    with pytest.raises(ExportError, match=r"batch_sizes \[0\]"):
        export_onnx(vae_checkpoint, tmp_path / "onnx", batch_sizes=[0])
    (tmp_path / "file").write_text("")
    with pytest.raises(ExportError, match=r"export_path '.*file' is a file"):
        export_onnx(vae_checkpoint, tmp_path / "file")
    with pytest.raises(
        ExportError, match=r"export_path '.*file/onnx/out': '.*file' is a file, so no directory can be made"
    ):
        export_onnx(vae_checkpoint, tmp_path / "file" / "onnx" / "out", trust=True)


class KthValueAutoencoder(models.Autoencoder):
    """Encodes through torch.kthvalue, which has no ONNX translation."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        code = super().encode(x)  # (B, d)
        return code - torch.kthvalue(code, 2, dim=1, keepdim=True).values


class ExportOnlyScaleAutoencoder(models.Autoencoder):
    """Computes something else while being exported: the graph silently differs from the eager model."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        code = super().encode(x)
        return code * 1.01 if torch.compiler.is_exporting() else code


def test_op_without_onnx_translation(tmp_path):
    ckpt = fit_and_save(ae_1d(KthValueAutoencoder), (1, 64), tmp_path / "kth.ckpt")
    config = config_for(tmp_path, KthValueAutoencoder)
    with pytest.raises(ExportError, match=r"encoder.onnx: .*the op aten.kthvalue has no ONNX translation"):
        export_onnx(ckpt, tmp_path / "onnx", config=config, trust=True)
    assert not (tmp_path / "onnx").exists()
    assert not list(tmp_path.glob(".onnx.*"))  # the staging directory is gone


def test_validation_failure_names_graph_and_worst_difference(tmp_path, capsys):
    ckpt = fit_and_save(ae_1d(ExportOnlyScaleAutoencoder), (1, 64), tmp_path / "bad.ckpt")
    config = config_for(tmp_path, ExportOnlyScaleAutoencoder)
    with pytest.raises(ValidationError) as err:
        export_onnx(ckpt, tmp_path / "api", config=config, batch_sizes=[2], validate=True, trust=True)
    assert err.value.report["passed"] is False and err.value.report["graphs"]["decoder"]["validation"]["passed"]
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["export", str(ckpt), "-c", str(config), "-o", str(tmp_path / "onnx"), "--batch_sizes", "1", "7",
             "--trust-checkpoint"]
        )  # fmt: skip
    assert exit_info.value.code == 2  # a user error, as in every other command
    captured = capsys.readouterr()
    assert "encoder.onnx: exported in" in captured.out and "DIFFERS from torch" in captured.out
    message = captured.err
    assert "encoder.onnx at batch" in message and "reconstruction.onnx at batch" in message
    assert "decoder.onnx" not in message  # decode() is untouched and validates
    assert "worst |diff|" in message
    report = json.loads((tmp_path / "onnx" / "export_report.json").read_text())
    assert report["passed"] is False
    assert report["graphs"]["decoder"]["validation"]["passed"] is True
    worst = report["graphs"]["encoder"]["validation"]["batches"][1]["worst"]
    assert worst["onnxruntime"] == pytest.approx(1.01 * worst["torch"], rel=1e-4)


def test_a_model_that_cannot_be_built_says_why():
    from spherinator.export.checkpoint import build_model

    # the reason sits under jsonargparse's wrapping; the message carries it, not just "Parser key 'model'"
    with pytest.raises(ExportError, match=r"could not build nosuchpkg.Model from a test: No module named 'nosuchpkg'"):
        build_model("nosuchpkg.Model", {}, "a test")
    encoder = {"class_path": "spherinator.models.ConvolutionalEncoder2D",
               "init_args": {"input_dim": [3, 16, 16], "output_dim": 8, "cnn_layers": []}}  # fmt: skip
    decoder = {"class_path": "spherinator.models.UpsamplingDecoder2D", "init_args": {"base_channels": 8}}
    with pytest.raises(ExportError, match=r"from a test: z_dim must be >= 2 .*got 1"):
        build_model(
            "spherinator.models.VariationalAutoencoder", {"encoder": encoder, "decoder": decoder, "z_dim": 1}, "a test"
        )


def test_a_checkpoint_from_before_the_centred_head_exports(cli_run, tmp_path):
    ckpt, _ = cli_run
    content = torch.load(ckpt, map_location="cpu", weights_only=True)
    content["state_dict"] = {k: v for k, v in content["state_dict"].items() if ".centre." not in k}
    older = tmp_path / "older.ckpt"
    torch.save(content, older)
    report = export_onnx(older, tmp_path / "onnx", batch_sizes=[2])  # load_from_checkpoint accepts it: so does export
    assert report["passed"] and (tmp_path / "onnx" / "encoder.onnx").is_file()


class BlockedModule:
    """Pickles to ``os.getcwd()``: a module torch 2.14 refuses as 'blocked', not as an unsupported global."""

    def __reduce__(self):
        import os

        return os.getcwd, ()


def test_a_pickle_naming_a_blocked_module_is_refused_as_such_and_read_when_trusted(tmp_path):
    crafted = tmp_path / "blocked.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"encoder": BlockedModule()}}, crafted)
    with pytest.raises(ExportError, match=r"stores '(posix|nt|os)\.getcwd' beyond tensors .*--trust-checkpoint"):
        export_onnx(crafted, tmp_path / "onnx")
    # trusted, the file is read in full and the export goes on to its next check
    with pytest.raises(ExportError, match="match 0 spherinator model classes"):
        export_onnx(crafted, tmp_path / "onnx", trust=True)
    assert not (tmp_path / "onnx").exists()


def test_a_full_or_read_only_disk_is_one_line_exit_2(cli_run, tmp_path, capsys):
    ckpt, _ = cli_run
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(ckpt), "-o", str(blocker / "onnx"), "--no-validate"])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("spherinator export: error: ") and "is a file, so no directory can be made there" in line


def test_export_options_are_checked_on_construction():
    from spherinator.export.onnx_export import ExportOptions

    assert ExportOptions().batch_sizes == (1, 7, 64)
    cases = [
        ({"opset": 17}, "opset 17 is not supported"),
        ({"batch_sizes": ()}, "batch_sizes []"),
        ({"atol": -1.0}, "tolerances must be >= 0"),
        ({"trace_batch_size": 0}, "trace_batch_size 0"),
    ]
    for kwargs, words in cases:
        with pytest.raises(ExportError) as info:
            ExportOptions(**kwargs)
        assert words in str(info.value)


def test_hostile_values_paths_and_checkpoints_are_one_line(vae_checkpoint, tmp_path):
    import os

    from spherinator.export.onnx_export import ExportOptions

    for kwargs, words in [
        ({"atol": float("nan")}, "tolerances must be >= 0 and finite (got atol=nan"),  # NaN passed every check
        ({"rtol": float("inf")}, "tolerances must be >= 0 and finite"),  # inf accepts any difference
        ({"batch_sizes": (10**9,)}, "batch_sizes [1000000000] must be"),  # a 12 TB allocation, then a traceback
    ]:
        with pytest.raises(ExportError) as info:
            ExportOptions(**kwargs)
        assert words in str(info.value)
    with pytest.raises(ExportError, match=r"a batch of 30,000 inputs of shape \(3, 32, 32\) is 0\.3 GiB"):
        export_onnx(vae_checkpoint, tmp_path / "big", batch_sizes=[1, 30000], trust=True)
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    with pytest.raises(ExportError, match=r"'.*dangling' is a link to nothing"):
        export_onnx(vae_checkpoint, tmp_path / "dangling", trust=True)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ExportError, match=r"'.*file' is a file, so no directory can be made there"):
        export_onnx(vae_checkpoint, tmp_path / "file" / "onnx", trust=True)
    for key, value, words in (("state_dict", "weights", "its 'state_dict' is a str"),
                              ("hyper_parameters", ["z_dim", 3], "its 'hyper_parameters' is a list")):  # fmt: skip
        odd = tmp_path / f"{key}.ckpt"
        torch.save({"state_dict": {"w": torch.ones(1)}, key: value}, odd)
        with pytest.raises(ExportError, match=words):
            export_onnx(odd, tmp_path / "onnx")
    twice = tmp_path / "config.yaml"
    twice.write_text(f"model:\n  class_path: {models.VariationalAutoencoder.__module__}.X\nmodel:\n  class_path: a.B\n")
    with pytest.raises(ExportError, match=r"model is given twice \(lines 1 and 3\)"):
        export_onnx(vae_checkpoint, tmp_path / "onnx", config=twice, trust=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "dangling", "file", "hyper_parameters.ckpt",
                                                          "state_dict.ckpt"]  # fmt: skip
    assert (tmp_path / "file").read_text() == "mine"
