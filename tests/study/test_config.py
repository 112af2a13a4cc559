"""Every YAML composes and instantiates; validation names the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from study.failures import trial_dataset
from study.grid import CONF_DIR
from study.models import ModelSpec
from study.optimizers import OptimizerSpec
from study.plan import plan_from_overrides
from study.schema import ConfigError
from study.tasks import Dataset


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["task", "model", "optimizer"])
def test_every_option_of_every_group_composes_and_instantiates(group: str,
                                                                tmp_path: Path) -> None:
    options = _options(group)
    assert options, f"no YAML under conf/{group}"
    table = tmp_path / "table.csv"  # task=table needs a file: a small one
    table.write_text("a,b,y\n" + "".join(f"{i},{i % 3},{i * 0.5}\n" for i in range(20)))
    needs = {("task", "table"): [f"task.path={table}", "task.target=y"]}
    for option in options:
        plan = plan_from_overrides([f"{group}={option}", *needs.get((group, option), [])])
        (point,) = plan.points
        trial = point.trial
        assert trial.labels[group] == option
        assert isinstance(trial.model, ModelSpec)
        assert isinstance(trial.optimizer, OptimizerSpec)
        data = trial.task.generate(1)
        assert isinstance(data, Dataset)
        # The sizes the task declares (the planner reads them without drawing).
        assert data.x_train.shape == (trial.task.n_train, trial.task.input_dim)
        assert data.x_val.shape[0] == trial.task.n_val


@pytest.mark.slow
@pytest.mark.parametrize("group", ["failure", "mitigation"])
def test_every_failure_and_mitigation_option_composes_and_applies(group: str) -> None:
    from study.config import NotApplicableError
    from study.seeds import seed_streams

    options = _options(group)
    assert "none" in options and len(options) > 10
    for option in options:
        try:
            plan = plan_from_overrides([f"{group}={option}"])
        except NotApplicableError:  # classification-only options
            plan = plan_from_overrides(["task=blobs", f"{group}={option}"])
        (point,) = plan.points
        trial = point.trial
        assert trial.labels[group] == option
        entries = trial.failures if group == "failure" else trial.mitigations
        assert (len(entries) == 0) == (option == "none")
        data = trial_dataset(trial, seed_streams(0).data)
        assert data.x_train.shape == (trial.task.n_train, trial.task.input_dim)


@pytest.mark.slow
def test_every_sweep_composes_and_expands() -> None:
    for option in _options("sweep"):
        plan = plan_from_overrides([f"+sweep={option}"])
        assert plan.name == option
        assert plan.points
        assert len({p.trial.key() for p in plan.points}) == len(plan.points)


def test_rdb_storage_option_reads_url_from_environment(monkeypatch) -> None:
    monkeypatch.setenv("STUDY_STORAGE_URL", "postgresql://u@127.0.0.1/db")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["storage=rdb"])
    assert cfg.storage.url == "postgresql://u@127.0.0.1/db"


def test_single_run_overrides_reach_the_specs() -> None:
    (point,) = plan_from_overrides(
        ["optimizer=adam", "optimizer.lr=0.3", "model.activation=sigmoid"]
    ).points
    assert type(point.trial.optimizer).__name__ == "Adam"
    assert point.trial.optimizer.lr == 0.3
    assert point.trial.model.activation == "sigmoid"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+optimizer.lrr=0.1"], "optimizer.lrr: unknown key for SGD"),
        (["+train.epochz=3"], "train.epochz"),
        (["optimizer.lr=-1"], "optimizer.lr is out of range"),
        (["train.batch_size=-4"], "train.batch_size must be >= 1"),
        (["train.batch_size=half"], "train.batch_size must be a positive integer or 'full'"),
        (["model.activation=swish"], "model.activation must be one of"),
        (["+sweep=smoke", "sweep.seeds=[]"], "sweep.seeds"),
        (["+sweep=smoke", "+sweep.axes.model={}"], "sweep.axes.model"),
        (["engine=fast"], "engine: must be one of"),
        (["task.n_train=0"], "task.n_train must be > 0"),
        (["+sweep=smoke", "sweep.name=a/b", "hydra.run.dir=x"], "sweep.name: expected a plain "
                                                                 "name"),
    ],
)
def test_bad_values_fail_with_a_message_naming_the_key(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_from_overrides(overrides)


@pytest.mark.parametrize(("target", "message"), [
    ("nope.Nope", "optimizer._target_: cannot import 'nope.Nope' (no module named 'nope')"),
    ("torch.optim.Nope", "optimizer._target_: cannot import 'torch.optim.Nope' "
                         "('torch.optim' has no attribute 'Nope')"),
    ("torch.nope.Nope", "optimizer._target_: cannot import 'torch.nope.Nope' "
                        "('torch' has no attribute 'nope')"),
    ("os.system", "optimizer._target_: 'os.system' is not a class "
                  "(builtin_function_or_method)"),
    ("123", "optimizer._target_: expected a dotted path such as module.Class, got 123"),
    ("buggy_target_module.Opt", "optimizer._target_: cannot import 'buggy_target_module.Opt' "
                                "(importing 'buggy_target_module' raised NameError: name "
                                "'undefined_name' is not defined)"),
    ("needy_target_module.Opt", "optimizer._target_: cannot import 'needy_target_module.Opt' "
                                "(importing 'needy_target_module' failed: No module named "
                                "'not_installed_dependency')"),
])
def test_a_target_that_names_no_class_is_one_line_with_its_reason(
        tmp_path: Path, monkeypatch, target: str, message: str) -> None:
    # A user's module with a bug of its own, or a dependency missing, is told apart from a
    # module that does not exist.
    (tmp_path / "buggy_target_module.py").write_text("x = undefined_name\n")
    (tmp_path / "needy_target_module.py").write_text("import not_installed_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as err:
        plan_from_overrides([f"optimizer._target_={target}"])
    assert str(err.value) == message


KIND_MODULE = """
import dataclasses


@dataclasses.dataclass(frozen=True)
class NotAnOptimizer:
    lr: float = 0.01
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False


@dataclasses.dataclass(frozen=True)
class Refuses(NotAnOptimizer):
    def __post_init__(self):
        raise RuntimeError("cannot build")


@dataclasses.dataclass(frozen=True)
class Asserts(NotAnOptimizer):
    def __post_init__(self):
        assert self.lr < 0.001, "lr too big"
"""


@pytest.mark.parametrize(("target", "message"), [
    ("kind_module.NotAnOptimizer", "optimizer._target_: kind_module.NotAnOptimizer is no "
                                   "optimizer spec (not a subclass of "
                                   "study.optimizers.OptimizerSpec)"),
    ("kind_module.Refuses", "optimizer: kind_module.Refuses raised RuntimeError: cannot "
                            "build"),
    ("kind_module.Asserts", "optimizer: kind_module.Asserts raised AssertionError: lr too "
                            "big"),
])
def test_a_user_class_of_the_wrong_kind_or_that_raises_is_one_line(
        tmp_path: Path, monkeypatch, target: str, message: str) -> None:
    """They ended in a traceback: a spec of the wrong kind when an engine used it, a
    constructor's own error (not a ValueError or TypeError) at once."""
    (tmp_path / "kind_module.py").write_text(KIND_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as err:
        plan_from_overrides([f"optimizer._target_={target}"])
    assert str(err.value) == message


def test_a_task_class_that_is_no_task_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "notask.yaml").write_text("_target_: study.models.ModelSpec\n")
    with pytest.raises(ConfigError) as err:
        plan_from_overrides([f"hydra.searchpath=[file://{tmp_path}]", "task=notask"])
    assert str(err.value).startswith("task._target_: study.models.ModelSpec is not a task")


def test_a_failure_entry_whose_target_names_nothing_is_named_by_its_entry(
        tmp_path: Path) -> None:
    (tmp_path / "failure").mkdir()
    (tmp_path / "failure" / "mine.yaml").write_text(
        "outliers:\n  _target_: study.failures.TargetOutlierz\n  fraction: 0.05\n")
    with pytest.raises(ConfigError) as err:
        plan_from_overrides([f"hydra.searchpath=[file://{tmp_path}]", "failure=mine"])
    assert str(err.value) == ("failure.outliers._target_: cannot import "
                              "'study.failures.TargetOutlierz' ('study.failures' has no "
                              "attribute 'TargetOutlierz')")


def test_a_claim_that_selects_no_planned_trial_is_refused_before_training(
        tmp_path: Path) -> None:
    # `optimizer` is no axis here: its values come from the planned trials' configs.
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "mine.yaml").write_text(
        "# @package _global_\nsweep:\n  name: mine\n  seeds: [0]\n  axes:\n"
        "    optimizer.lr: [0.01, 0.1]\n  claims:\n    - statement: s\n"
        "      metric: diverged\n      where: {optimizer: adam}\n"
        "      trend: optimizer.lr\n      expect: increasing\n")
    with pytest.raises(ConfigError) as err:
        plan_from_overrides([f"hydra.searchpath=[file://{tmp_path}]", "+sweep=mine"])
    assert str(err.value) == ("sweep.claims[0].where.optimizer: no trial has optimizer='adam' "
                              "(its values: ['sgd']); the claim would select nothing")
    plan = plan_from_overrides([f"hydra.searchpath=[file://{tmp_path}]", "+sweep=mine",
                                "optimizer=adam"])
    assert len(plan.points) == 2


def test_an_axis_or_a_space_key_added_on_the_command_line_is_a_dotted_key() -> None:
    # Hydra nests `+sweep.axes.model.depth=[1,2]` under model: it is the axis model.depth.
    plan = plan_from_overrides(["+sweep=smoke", "+sweep.axes.model.depth=[1,2]"])
    assert plan.axes["model.depth"] == [1, 2]
    assert sorted({p.trial.model.depth for p in plan.points}) == [1, 2]
    search = plan_from_overrides(["+sweep=adam_search", "+sweep.space.model.depth={low:1,high:4}",
                                  "sweep.trials=2"])
    assert search.space["model.depth"].low == 1 and "model" not in search.space
    with pytest.raises(ConfigError, match=r"sweep.axes.model.depth: given twice"):
        plan_from_overrides(["+sweep=smoke", "+sweep.axes.model.depth=[1,2]",
                             "+sweep.axes={model.depth: [3]}"])


def test_empty_axis_and_unknown_axis_key_are_rejected(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    import shutil

    shutil.copytree(CONF_DIR, conf)
    (conf / "sweep" / "empty.yaml").write_text(
        "# @package _global_\nsweep:\n  name: empty\n  axes:\n    optimizer.lr: []\n"
    )
    (conf / "sweep" / "typo.yaml").write_text(
        "# @package _global_\nsweep:\n  name: typo\n  axes:\n    optimizer.lrr: [0.1]\n"
    )
    (conf / "sweep" / "noaxes.yaml").write_text(
        "# @package _global_\nsweep:\n  name: noaxes\n  axes: {}\n"
    )
    with pytest.raises(ConfigError, match=r"sweep.axes.optimizer.lr: no values \(empty grid\)"):
        plan_from_overrides(["+sweep=empty"], conf_dir=conf)
    with pytest.raises(ConfigError, match="sweep.axes.optimizer.lrr: no such key"):
        plan_from_overrides(["+sweep=typo"], conf_dir=conf)
    with pytest.raises(ConfigError, match="empty grid"):
        plan_from_overrides(["+sweep=noaxes"], conf_dir=conf)


@pytest.mark.parametrize(("values", "message"), [
    ({"lr": float("inf")}, "optimizer.lr: must be a finite number, got inf"),
    ({"lr": float("nan")}, "optimizer.lr: must be a finite number, got nan"),
    ({"lr": "abc"}, "optimizer.lr: expected a number, got 'abc'"),
    ({"lr": True}, "optimizer.lr: expected a number, got True"),
    ({"depth": 2.0}, "optimizer.depth: expected an integer, got 2.0"),
])
def test_check_values_names_the_key_of_a_value_that_is_no_finite_number(
        values: dict, message: str) -> None:
    from study.config import check_values

    with pytest.raises(ConfigError, match=f"^{message.replace('(', '.').replace(')', '.')}$"):
        check_values("optimizer", values, {"lr": float, "depth": int})
    check_values("optimizer", {"lr": 0.1, "depth": 2}, {"lr": float, "depth": int})


def test_the_yaml_sets_no_default_the_schema_holds() -> None:
    """Defaults live in the schema (and the specs): conf/config.yaml holds the group
    choices and Hydra's settings, a storage option its kind and URL."""
    top = yaml.safe_load((CONF_DIR / "config.yaml").read_text())
    assert set(top) == {"defaults", "hydra"}
    for path in (CONF_DIR / "storage").glob("*.yaml"):
        assert set(yaml.safe_load(path.read_text())) <= {"defaults", "kind", "url"}, path.name
