"""--init-from: public pretraining, then a (DP) fine-tune: what is loaded, what is re-initialised, what DP-SGD trains,
what is refused, and what the ledger, info and the audit say."""

import hashlib
import json
import shutil
import warnings
from fnmatch import fnmatchcase

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY, make_dataset

from augflow.audit.report import _privacy_text
from augflow.cli import cli
from augflow.errors import ConfigError, PrivacyError
from augflow.models import load_model
from augflow.train.init_from import InitWarning, open_init
from augflow.train.loop import Objective, initial_model, open_session, train
from augflow.train.privacy import session as private_session
from augflow.train.privacy.checks import check_modules
from augflow.train.privacy.trainable import select_trainable
from augflow.train.recipe import load_recipe
from augflow.train.rows import TrainingRows

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::augflow.errors.PrivacyWarning"),
              pytest.mark.filterwarnings("ignore::augflow.train.init_from.InitWarning")]
PLAIN = [*TINY, "train.ema_decay=0.0"]
DP = [*PLAIN, "train.epochs=1", "privacy.enabled=true", "privacy.epsilon=8", "privacy.microbatch=8"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A public model (8 px, classes class0-2, trained 2 steps with its own mask: the left half of the image) and
    private files: the same classes, four classes, and 16 px images."""
    w = tmp_path_factory.mktemp("init")
    mask = np.zeros((8, 8), dtype=np.float32)
    mask[:, :4] = 1
    np.save(w / "mask.npy", mask)
    public = make_dataset(w / "public.h5", seed=5)
    train(public, w / "pub", load_recipe(None, [*PLAIN, "train.max_steps=2", f"train.app_mask='{w / 'mask.npy'}'"]),
          progress=False)
    make_dataset(w / "same.h5", seed=6)
    make_dataset(w / "four.h5", seed=7, num_classes=4)
    make_dataset(w / "big.h5", seed=8, shape=(1, 16, 16))
    return w


def _from(world, overrides):
    return [*overrides, f"train.init_from='{world / 'pub'}'"]


def _opened(world, data, overrides):
    """``(model before any step, init, session)`` of a run, as train() builds them."""
    recipe = load_recipe(None, overrides)
    rows = TrainingRows.open(world / data, None, recipe.train.val_fraction, seed=0)
    init = open_init(recipe, rows)
    session = open_session(recipe, rows, 0, CPU, init=init)
    return initial_model(recipe, rows, session, 0, CPU, init=init), init, session


def _public_state(world):
    return load_model(world / "pub").state_dict()


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp"])
def test_every_tensor_but_the_class_shaped_ones_is_loaded_bit_exactly(world, dp):
    public = _public_state(world)
    overrides = _from(world, [*(DP if dp else PLAIN), *(["train.init_from_public=true"] if dp else [])])
    with pytest.warns(InitWarning, match=r"classes differ .*re-initialised.*layers.0.coupling.net_b.embed.0.weight"):
        model, init, _ = _opened(world, "four.h5", overrides)
    state = model.state_dict()
    # Only the label embeddings' first layers depend on the class count: (E, K) with K = 4 here, 3 in the public model.
    assert init.reinitialized and all(name.endswith(".embed.0.weight") for name in init.reinitialized)
    assert len(init.reinitialized) == sum(name.endswith(".embed.0.weight") for name in state)
    for name, tensor in state.items():
        if name in init.reinitialized:
            assert tensor.shape[1] == 4 and public[name].shape[1] == 3, name
        else:
            assert torch.equal(tensor, public[name]), name  # bit-exact: ActNorm and masks were not recomputed
    assert torch.equal(state["app_mask"], torch.from_numpy(np.load(world / "mask.npy")))  # the public model's mask
    # The same class names: nothing is re-initialised, the whole model is the public one.
    with warnings.catch_warnings():
        warnings.simplefilter("error", InitWarning)
        same, init, _ = _opened(world, "same.h5", overrides)
    assert init.reinitialized == ()
    assert all(torch.equal(t, public[n]) for n, t in same.state_dict().items())


@pytest.mark.parametrize("trainable", ["conditioning", "top", ["*.embed.*", "layers.0.*"]],
                         ids=["conditioning", "top", "patterns"])
def test_dp_trains_only_the_selected_parameters(world, tmp_path, trainable):
    public = _public_state(world)
    overrides = _from(world, [*DP, "train.init_from_public=true", f"privacy.trainable={json.dumps(trainable)}",
                              "train.max_steps=2"])
    model, init, session = _opened(world, "same.h5", overrides)
    selected, info = select_trainable(model, trainable)
    params = session.trainable(model)
    optimizer = torch.optim.AdamW(params)
    session.attach(Objective(model, 0.0), optimizer)
    # Per-sample gradients and the DPOptimizer see the selected parameters only.
    named = {n.removeprefix("model.") for n, _ in session.private_step.named}  # names in the Objective module
    assert named == {n for n in selected if dict(model.named_parameters())[n].numel()} and named
    assert len(session.private_step.optimizer.params) == len(named) == len(params) < len(list(model.parameters()))
    assert info["frozen_elements"] > 0 and info["trained_elements"] > 0

    result = train(world / "same.h5", tmp_path / "run", load_recipe(None, overrides), progress=False)
    assert result.steps == 2
    after = load_model(result.model_path).state_dict()
    for name, tensor in after.items():
        if name in selected and tensor.numel():
            assert not torch.equal(tensor, public[name]), name  # clipped, noised and applied
        else:
            assert torch.equal(tensor, public[name]), name  # frozen (or a buffer): bit-identical after DP steps
    assert result.ledger.init_from["trainable"]["selection"] == trainable


def test_frozen_parameters_not_from_a_declared_public_init_are_still_refused(world, tmp_path):
    # Without --init-from, privacy.trainable would freeze weights of unknown origin.
    with pytest.raises(PrivacyError, match=r"privacy.trainable = 'conditioning' freezes.*--init-from-public"):
        train(world / "same.h5", tmp_path / "r", load_recipe(None, [*DP, "privacy.trainable='conditioning'"]),
              progress=False)
    # A parameter frozen by other means that was not loaded from the public model (here a re-initialised one).
    model, init, session = _opened(world, "four.h5", _from(world, [*DP, "train.init_from_public=true",
                                                                   "privacy.trainable='conditioning'"]))
    model.get_parameter(init.reinitialized[0]).requires_grad_(False)
    with pytest.raises(PrivacyError, match=r"frozen \(pretrained\) parameters.*--init-from-public"):
        session.trainable(model)
    # check_modules: frozen and named public passes; frozen and not named is refused.
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).requires_grad_(False))
    check_modules(net, public={"1.weight", "1.bias"})
    with pytest.raises(PrivacyError, match=r"module '1' \(Linear\): it has frozen"):
        check_modules(net, public={"1.weight"})
    assert not (tmp_path / "r").exists()


def test_an_undeclared_or_private_init_is_refused_under_dp(world, tmp_path):
    with pytest.raises(PrivacyError, match=r"--init-from .*pub under --dp.*declare it with --init-from-public"):
        train(world / "same.h5", tmp_path / "r", load_recipe(None, _from(world, DP)), progress=False)
    # Declared public, yet trained on this run's own file: the declaration cannot be true.
    with pytest.raises(PrivacyError, match=r"declared public, but it was trained on a file of this run"):
        train(world / "public.h5", tmp_path / "r",
              load_recipe(None, _from(world, [*DP, "train.init_from_public=true"])), progress=False)
    with pytest.raises(ConfigError, match=r"--init-from-public .*no model is given"):
        train(world / "same.h5", tmp_path / "r", load_recipe(None, [*DP, "train.init_from_public=true"]),
              progress=False)
    assert not (tmp_path / "r").exists()


def test_another_image_shape_family_or_architecture_is_a_clear_error_and_no_run_folder(world, tmp_path):
    with pytest.raises(ConfigError, match=r"trained on images of shape \(1, 8, 8\), but --data .*big.h5 has images of "
                                          r"shape \(1, 16, 16\); the image shape must match"):
        train(world / "big.h5", tmp_path / "r", load_recipe(None, _from(world, PLAIN)), progress=False)
    with pytest.raises(ConfigError, match=r"architecture differs.*model.embed_dim 8 \(init model\) vs 16 \(recipe\)"):
        train(world / "same.h5", tmp_path / "r", load_recipe(None, _from(world, [*PLAIN, "model.embed_dim=16"])),
              progress=False)
    with pytest.raises(ConfigError, match=r"a 'magic' model, but the recipe trains model.family = 'symmflow'"):
        train(world / "same.h5", tmp_path / "r", load_recipe(None, [f"train.init_from='{world / 'pub'}'",
                                                                   "model.family='symmflow'"]), progress=False)
    with pytest.raises(ConfigError, match=r"train.app_mask .*cannot be combined"):
        train(world / "same.h5", tmp_path / "r",
              load_recipe(None, _from(world, [*PLAIN, f"train.app_mask='{world / 'mask.npy'}'"])), progress=False)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("value", ["bogus", [], [3], ["nothing.*"]], ids=["word", "empty", "number", "no-match"])
def test_a_bad_trainable_value_is_a_clear_error(world, tmp_path, value):
    recipe = load_recipe(None, _from(world, [*DP, "train.init_from_public=true",
                                             f"privacy.trainable={json.dumps(value)}"]))
    expected = r"'nothing\.\*' matches no parameter" if value == ["nothing.*"] else \
        r"privacy.trainable must be one of 'all', 'conditioning', 'top', or a non-empty list"
    with pytest.raises(PrivacyError, match=expected):
        train(world / "same.h5", tmp_path / "r", recipe, progress=False)
    with pytest.raises(ConfigError, match=r"privacy.trainable = 'top' applies to DP training only"):
        train(world / "same.h5", tmp_path / "r", load_recipe(None, [*PLAIN, "privacy.trainable='top'"]), progress=False)
    assert not (tmp_path / "r").exists()


def test_the_ledger_info_and_audit_carry_the_public_initialisation(world, tmp_path):
    runner = CliRunner()
    sets = [arg for text in DP if not text.startswith("privacy.") for arg in ("--set", text)]
    result = runner.invoke(cli, ["train", "--data", str(world / "four.h5"), "--out", str(tmp_path / "run"), "--dp",
                                 "--epsilon", "8", "--init-from", str(world / "pub"), "--init-from-public",
                                 "--set", "privacy.trainable=conditioning", "--set", "privacy.microbatch=8",
                                 "--device", "cpu", *sets])
    assert result.exit_code == 0, result.output
    assert "initialisation: pretrained on public data" in result.output and "-DP per slice" in result.output
    _, meta = load_model(tmp_path / "run", with_meta=True)
    _, public_meta = load_model(world / "pub", with_meta=True)
    init = meta["privacy"]["init_from"]
    assert init["model_sha256"] == hashlib.sha256((world / "pub" / "model.pt").read_bytes()).hexdigest()
    assert init["dataset_fingerprint"] == public_meta["fingerprint"] and init["model_privacy"] == {"dp": False}
    assert init["declared_public"] is True and "declared public by the user" in init["declaration"]
    assert init["class_names"] == ["class0", "class1", "class2"] and len(init["reinitialized"]) == 16
    trained = init["trainable"]
    assert trained["selection"] == "conditioning" and trained["plus_reinitialized"] == 16
    assert "--init-from model" in meta["privacy"]["public_inputs"]["app_mask"]
    shown = runner.invoke(cli, ["info", str(tmp_path / "run")]).output
    sha = public_meta["fingerprint"]["data_sha256"][:12]
    assert f"initialisation: pretrained on public data (data SHA-256 {sha}" in shown
    assert "fine-tuned with (" in shown and "re-initialised (class-shaped): 16 (" in shown
    as_json = json.loads(runner.invoke(cli, ["info", str(tmp_path / "run"), "--json"]).output)
    assert as_json["privacy"] == meta["privacy"]
    text = _privacy_text({"ledger": meta["privacy"]})
    assert text.startswith(f"Privacy: The generator was pretrained on public data (data SHA-256 {sha}")
    assert "fine-tuned with (" in text and "covers the private fine-tuning data only" in text
    # Without DP the start is recorded too, undeclared here: no claim that the data were public.
    plain = train(world / "four.h5", tmp_path / "plain", load_recipe(None, _from(world, [*PLAIN, "train.max_steps=1"])),
                  progress=False)
    ledger = plain.ledger.to_dict()
    assert ledger["dp"] is False and ledger["init_from"]["declared_public"] is False
    assert "not declared public" in plain.ledger.pretraining() and "without differential privacy" in \
        _privacy_text({"ledger": ledger})


def test_an_init_from_run_resumes_exactly_without_the_init_file(world, tmp_path, monkeypatch):
    monkeypatch.setattr(private_session, "new_secret", lambda: "0123456789abcdef0123456789abcdef")
    shutil.copytree(world / "pub", tmp_path / "pub")
    overrides = [*DP, "train.epochs=2", "train.init_from_public=true", "privacy.trainable='top'",
                 f"train.init_from='{tmp_path / 'pub'}'"]
    full = train(world / "four.h5", tmp_path / "full", load_recipe(None, overrides), progress=False)
    train(world / "four.h5", tmp_path / "part", load_recipe(None, [*overrides, "train.max_steps=4"]), progress=False)
    shutil.rmtree(tmp_path / "pub")  # the checkpoint holds the weights and the record of the init model
    resumed = train(world / "four.h5", tmp_path / "part", load_recipe(None, overrides), resume=True, progress=False)
    assert resumed.steps == full.steps == 6 and resumed.ledger.to_dict() == full.ledger.to_dict()
    a, b = load_model(full.model_path).state_dict(), load_model(resumed.model_path).state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7)
    # Under "top" everything outside the coarsest scale and the re-initialised embeddings stays the public model's.
    trained = set(resumed.ledger.init_from["reinitialized"])
    top = load_model(resumed.model_path).parameter_groups()["top"]
    public = _public_state(world)
    kept = [n for n in b if n not in trained and not any(fnmatchcase(n, p) for p in top)]
    assert kept and all(torch.equal(b[n], public[n]) for n in kept)
    assert not all(torch.equal(b[n], public[n]) for n in b if n not in kept and n not in trained)


def test_the_shipped_recipe_pair_pretrains_then_fine_tunes(world, tmp_path):
    # The recipes' own settings at the tiny size of the tests: the model and the length come from PLAIN.
    public = train(world / "public.h5", tmp_path / "pub", load_recipe("scanner-public", [*PLAIN, "train.max_steps=1"]),
                   progress=False)
    assert not public.ledger.dp
    recipe = load_recipe("scanner-dp-finetune", [*PLAIN, "train.max_steps=1", "privacy.microbatch=8",
                                                 f"train.init_from='{tmp_path / 'pub'}'"])
    result = train(world / "same.h5", tmp_path / "ft", recipe, progress=False)
    init = result.ledger.init_from
    assert result.ledger.dp and result.ledger.unit == "subject" and init["declared_public"]
    assert init["trainable"]["selection"] == "conditioning" and init["reinitialized"] == []
