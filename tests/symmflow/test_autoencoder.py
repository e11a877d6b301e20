"""The autoencoder of latent MedSymmFlow: shapes, training beats the mean image, latent flow, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from augflow.cli import cli
from augflow.data.store import write_dataset
from augflow.errors import ConfigError
from augflow.models import load_model
from augflow.symmflow import Autoencoder, AutoencoderConfig, SymmFlow, SymmFlowConfig
from augflow.train.autoencoder import train_autoencoder
from augflow.train.loop import train
from augflow.train.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def blobs(path, n=48, size=16, seed=0):
    """Images with structure an autoencoder can learn: a bright disc of random position and size."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    images = np.zeros((n, 1, size, size), dtype=np.float32)
    for i in range(n):
        r0, c0, rad = rng.uniform(4, size - 4, 2).tolist() + [rng.uniform(2, 5)]
        images[i, 0] = ((rows - r0) ** 2 + (cols - c0) ** 2 <= rad**2) * rng.uniform(0.5, 1.0)
    labels = np.arange(n) % 2
    return write_dataset(path, images, labels, [f"s{i // 2}" for i in range(n)], np.zeros(n, dtype=np.int64),
                         ["a", "b"], provenance={"test": True})


def test_encode_decode_shapes():
    ae = Autoencoder(AutoencoderConfig(image_shape=(1, 16, 16), latent_channels=3, downsample=4, channels=8))
    x = torch.rand(2, 1, 16, 16)
    z = ae.encode(x)
    assert z.shape == (2, 3, 4, 4) and ae.config.latent_shape == (3, 4, 4)
    assert ae.decode(z).shape == (2, 1, 16, 16)
    vae = Autoencoder(AutoencoderConfig(image_shape=(1, 16, 16), downsample=2, channels=8, kl_weight=1e-3))
    assert vae.encode(x).shape == (2, 4, 8, 8) and vae.loss(x).shape == (2,)
    with pytest.raises(ConfigError, match="power of two"):
        AutoencoderConfig(image_shape=(1, 16, 16), downsample=3).validate()


def test_trained_autoencoder_beats_the_mean_image_and_drives_a_latent_flow(tmp_path):
    data = blobs(tmp_path / "d.h5")
    result = train_autoencoder(data, tmp_path / "ae", latent_channels=2, downsample=2, channels=8, epochs=15,
                               batch_size=16, lr=3e-3, progress=False)
    assert result.path.is_file() and (tmp_path / "ae" / "metrics.jsonl").is_file()
    assert result.train_mse < 0.5 * result.mean_image_mse  # reconstructs, not just predicts the average

    config = SymmFlowConfig.from_dict({"image_shape": (1, 16, 16), "num_classes": 2, "base_channels": 8,
                                       "channel_mult": [1, 2], "attention_resolutions": [], "num_heads": 1,
                                       "steps": 2, "autoencoder": str(tmp_path / "ae")})
    assert config.latent
    flow = SymmFlow(config)
    assert flow.flow_shape == (2, 8, 8)
    assert "without differential privacy" in flow.dp_blocker  # the autoencoder saw the training images
    from augflow.errors import PrivacyError
    from augflow.train.privacy.checks import check_model

    with pytest.raises(PrivacyError, match="without differential privacy"):
        check_model(flow)  # augflow train --dp refuses the latent mode
    x, y = torch.rand(3, 1, 16, 16), torch.tensor([0, 1, 1])
    flow.training_loss(x, y).mean().backward()
    assert all(p.grad is None for p in flow.autoencoder.parameters())  # frozen
    assert all(p.grad is not None for p in flow.unet.parameters())
    flow.eval()
    assert flow.sample(y).shape == (3, 1, 16, 16) and flow.class_scores(x).shape == (3, 2)
    # Through the training loop (EMA deep-copies the model with its frozen autoencoder).
    recipe = load_recipe("quick-symmflow", ["model.base_channels=8", "model.channel_mult=[1, 2]",
                                            "model.attention_resolutions=[]", "model.num_heads=1", "model.steps=2",
                                            f"model.autoencoder='{tmp_path / 'ae'}'", "train.max_steps=2",
                                            "train.batch_size=8"])
    run = train(data, tmp_path / "run", recipe, progress=False)
    assert load_model(run.model_path).autoencoder is not None
    # The saved model is self-contained: it loads without the autoencoder file.
    flow.save(tmp_path / "flow.pt")
    (tmp_path / "ae" / "autoencoder.pt").unlink()
    loaded = load_model(tmp_path / "flow.pt")
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(loaded.sample(y, generator=g), flow.sample(y, generator=g.manual_seed(0)))
    with pytest.raises(ConfigError, match="train-autoencoder"):
        SymmFlow(config)


def test_cli_train_autoencoder(tmp_path):
    data = blobs(tmp_path / "d.h5", n=16)
    out = tmp_path / "ae"
    result = CliRunner().invoke(cli, ["train-autoencoder", "--data", str(data), "--out", str(out), "--epochs", "1",
                                      "--channels", "8", "--downsample", "2", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "reconstruction MSE" in result.output and (out / "autoencoder.pt").is_file()
    bad = CliRunner().invoke(cli, ["train-autoencoder", "--data", str(data), "--out", str(out), "--downsample", "3"])
    assert bad.exit_code == 1 and "power of two" in bad.output
