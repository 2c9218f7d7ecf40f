"""otfuse.flower: the OTFusion strategy on Flower's records, its fault handling, the apps, and a
simulation through Flower's Ray engine."""

from __future__ import annotations

import math
import sys

import pytest
import torch

flwr = pytest.importorskip("flwr")

from flwr.app import (  # noqa: E402
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)

from otfuse import zoo  # noqa: E402
from otfuse.flower import FederatedSettings, MeteredFedAvg, OTFusion  # noqa: E402
from otfuse.flower.settings import SettingsError  # noqa: E402
from otfuse.flower.simulation import NODE_ID_BASE, client_replies, train_message  # noqa: E402
from otfuse.flower.strategy import FlowerSetupError, model_record  # noqa: E402


def small(seed: int, width: float = 0.25, name: str = "mlpnet") -> torch.nn.Module:
    torch.manual_seed(seed)
    return zoo.create(name, width=width, in_shape=(1, 28, 28)).eval()


def reply(model: torch.nn.Module, node: int, examples: int = 100, **metrics: float) -> Message:
    """A client's train reply carrying ``model`` (its weights, examples and architecture)."""
    content = RecordDict({
        "arrays": ArrayRecord(model.state_dict()),
        "metrics": MetricRecord({"num-examples": examples, "train-loss": 1.0, **metrics}),
        "model": model_record(model),
    })  # fmt: skip
    return Message(content, reply_to=train_message(ArrayRecord(), NODE_ID_BASE + node))


def error_reply(node: int, reason: str = "<class 'RuntimeError'>:<'disk full'>") -> Message:
    return Message(
        Error(code=2, reason=reason), reply_to=train_message(ArrayRecord(), NODE_ID_BASE + node)
    )


def state_of(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return arrays.to_torch_state_dict()


def relative(a: dict, b: dict) -> float:
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in a)
    return math.sqrt(num / sum(float(b[k].pow(2).sum()) for k in b))


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a ServerApp process has set before its strategy builds messages."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


class FakeGrid:
    """The part of a Flower Grid that ``configure_train`` uses: the connected node ids."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


# --------------------------------------------------------------------------------------------------
# aggregate_train on Flower's records, in process


def test_fuses_rather_than_averages_and_weights_by_examples() -> None:
    models = [small(s) for s in range(3)]
    strategy = OTFusion(models[0], "paper-wts")
    arrays, metrics = strategy.aggregate_train(1, [reply(m, k) for k, m in enumerate(models)])
    assert set(state_of(arrays)) == set(models[0].state_dict())
    assert metrics["fused"] == 1 and metrics["clients-fused"] == 3
    assert metrics["distance-to-average"] > 0.1  # units were moved, not averaged in place
    fedavg, _ = MeteredFedAvg().aggregate_train(1, [reply(m, k) for k, m in enumerate(models)])
    assert relative(state_of(arrays), state_of(fedavg)) > 0.1
    # weights proportional to examples: a client with almost all the data dominates (and anchors)
    heavy = [reply(m, k, examples=n) for k, (m, n) in enumerate(zip(models, [1, 100000, 1]))]
    arrays, _ = OTFusion(models[0], "paper-wts").aggregate_train(1, heavy)
    assert relative(state_of(arrays), models[1].state_dict()) < 0.01


def test_same_models_fuse_to_the_same_model_and_metrics_are_flower_records() -> None:
    model = small(0)
    strategy = OTFusion(model, "paper-wts")
    arrays, metrics = strategy.aggregate_train(1, [reply(model, 0), reply(model, 1, examples=3)])
    assert isinstance(arrays, ArrayRecord) and isinstance(metrics, MetricRecord)
    assert relative(state_of(arrays), model.state_dict()) < 1e-5
    assert metrics["train-loss"] == pytest.approx(1.0)  # the clients' metrics, weighted
    assert metrics["distance-to-average"] < 1e-5


def test_clients_of_other_widths_are_aligned_into_the_global_widths() -> None:
    models = [small(0), small(1, width=0.125), small(2, width=0.375)]
    strategy = OTFusion(models[0], "paper-wts")
    arrays, metrics = strategy.aggregate_train(1, [reply(m, k) for k, m in enumerate(models)])
    assert metrics["clients-fused"] == 3 and metrics["excluded-architecture"] == 0
    shapes = {k: v.shape for k, v in state_of(arrays).items()}
    assert shapes == {k: v.shape for k, v in models[0].state_dict().items()}


def faulty_round(strategy: OTFusion) -> tuple:
    """Six clients sampled; one replies with an error, one never replies, one sends NaN, one a
    ConvNet, one no num-examples; one is healthy, and a healthy one has the global widths."""
    nodes = [NODE_ID_BASE + k for k in range(7)]
    strategy.configure_train(1, ArrayRecord(small(0).state_dict()), ConfigRecord(), FakeGrid(nodes))
    nan = small(3)
    with torch.no_grad():
        nan.features[0].weight[0, 0] = math.inf
    no_examples = reply(small(4), 4)
    del no_examples.content.metric_records["metrics"]["num-examples"]
    replies = [
        reply(small(0), 0),
        reply(small(1), 1),
        error_reply(2),
        reply(nan, 3),
        no_examples,
        reply(small(5, name="convnet", width=1.0), 5),
        # node 6 was sampled but does not reply: a timeout
    ]
    return strategy.aggregate_train(1, replies)


def test_each_fault_is_left_out_with_its_reason_and_the_round_completes(caplog) -> None:
    strategy = OTFusion(small(0), "paper-wts", min_train_nodes=2)
    arrays, metrics = faulty_round(strategy)
    assert arrays is not None and metrics["fused"] == 1
    assert metrics["clients-fused"] == 2 and metrics["clients-excluded"] == 5
    for reason in ("failed", "timeout", "malformed", "non-finite", "architecture"):
        assert metrics[f"excluded-{reason}"] == 1, reason
    report = strategy.reports[-1]
    reasons = {c.node_id - NODE_ID_BASE: (c.reason, c.detail) for c in report.clients}
    assert reasons[0][0] is None and reasons[1][0] is None
    assert reasons[2] == ("failed", "<class 'RuntimeError'>:<'disk full'>")
    assert reasons[3][0] == "non-finite" and "features.0.weight" in reasons[3][1]
    assert reasons[4][0] == "malformed" and reasons[5][0] == "architecture"
    assert reasons[6][0] == "timeout"
    assert all(torch.isfinite(v).all() for v in state_of(arrays).values())
    assert "leaves out node" in caplog.text


def test_too_few_usable_clients_keep_the_previous_global_model() -> None:
    strategy = OTFusion(small(0), "paper-wts", min_train_nodes=3)
    arrays, metrics = faulty_round(strategy)
    assert arrays is None  # Flower keeps the previous global model
    assert metrics["fused"] == 0 and metrics["clients-fused"] == 0
    assert "fewer than min_fused_nodes=3" in strategy.reports[-1].failure


def test_no_client_of_the_global_architecture_writes_no_model() -> None:
    strategy = OTFusion(small(0), "paper-wts")
    replies = [reply(small(1, width=0.125), 0), reply(small(2, width=0.125), 1)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is None and metrics["fused"] == 0
    assert "architecture" in strategy.reports[-1].failure


def test_data_recipe_uses_the_server_sample_and_needs_one() -> None:
    with pytest.raises(FlowerSetupError, match="needs data"):
        OTFusion(small(0), "data")
    sample = torch.randn(64, 1, 28, 28)
    config = "paper-acts"
    strategy = OTFusion(small(0), config, server_data=sample)
    arrays, metrics = strategy.aggregate_train(1, [reply(small(s), s) for s in range(2)])
    assert arrays is not None and metrics["fused"] == 1


def test_refit_runs_only_in_the_first_refit_rounds(monkeypatch) -> None:
    import otfuse.flower.strategy as strategy_module

    seen = []
    real = strategy_module.fuse
    monkeypatch.setattr(
        strategy_module,
        "fuse",
        lambda models, config, **kw: seen.append(config.stages) or real(models, config, **kw),
    )
    sample = torch.randn(64, 1, 28, 28)
    replies = [reply(small(s), s) for s in range(2)]
    strategy = OTFusion(small(0), "data", server_data=sample, refit_rounds=1)
    for server_round in (1, 2, 3):
        arrays, _ = strategy.aggregate_train(server_round, replies)
        assert arrays is not None
    assert seen == [("bn_reset", "repair", "refit"), ("bn_reset", "repair"), ("bn_reset", "repair")]
    seen.clear()
    OTFusion(small(0), "data", server_data=sample, refit_rounds=None).aggregate_train(5, replies)
    assert seen == [("bn_reset", "repair", "refit")]  # None: every round
    with pytest.raises(FlowerSetupError, match="refit_rounds"):
        OTFusion(small(0), "data", server_data=sample, refit_rounds=-1)


def test_guard_keeps_whichever_is_closer_to_the_clients_ensemble() -> None:
    from otfuse.flower.strategy import RoundReport, _closer

    model, stranger = small(0), small(9)
    x = torch.randn(32, 1, 28, 28)
    report = RoundReport(1)
    kept = _closer(stranger, model, [model, model], [1.0, 3.0], x, report)
    assert kept is model and report.kept_average and report.kl_average < 1e-6 < report.kl_fused
    report = RoundReport(1)
    assert _closer(model, stranger, [model, model], [1.0, 1.0], x, report) is model
    assert not report.kept_average


def test_with_class_counts_the_guard_compares_with_the_coverage_mixture() -> None:
    from otfuse.distill import teacher_log_probs
    from otfuse.flower.strategy import RoundReport, _closer

    a, b, fused = small(0), small(1), small(2)
    x = torch.randn(32, 1, 28, 28)
    counts = [[100.0] * 5 + [0.0] * 5, [3.0] * 10]
    report = RoundReport(1)
    _closer(fused, b, [a, b], [1.0, 2.0], x, report, counts)
    with torch.no_grad():
        scores = [m.eval()(x) for m in (a, b)]
        target = teacher_log_probs(scores, [1.0, 2.0], "coverage", counts)
        want = (target.exp() * (target - torch.log_softmax(fused(x), -1))).sum(-1).mean()
    assert report.kl_fused == pytest.approx(float(want), rel=1e-4)
    ensemble = RoundReport(1)
    _closer(fused, b, [a, b], [1.0, 2.0], x, ensemble)
    assert ensemble.kl_fused != pytest.approx(report.kl_fused, rel=1e-3)


def test_guard_runs_on_held_out_server_inputs_and_reports_in_the_metrics() -> None:
    models = [small(s) for s in range(3)]
    sample = torch.randn(64, 1, 28, 28)
    strategy = OTFusion(models[0], "paper-wts", server_data=sample)
    arrays, metrics = strategy.aggregate_train(1, [reply(m, k) for k, m in enumerate(models)])
    assert metrics["kept-average"] in (0, 1) and math.isfinite(metrics["kl-fused"])
    assert math.isfinite(metrics["kl-average"])
    kept = metrics["kl-average"] < metrics["kl-fused"]
    assert metrics["kept-average"] == int(kept)
    assert (metrics["distance-to-average"] < 1e-6) == kept
    unguarded = OTFusion(models[0], "paper-wts", server_data=sample, guard=False)
    _, metrics = unguarded.aggregate_train(1, [reply(m, k) for k, m in enumerate(models)])
    assert metrics["kept-average"] == 0 and math.isnan(metrics["kl-fused"])


def test_metered_fedavg_counts_bytes() -> None:
    strategy = MeteredFedAvg()
    arrays = ArrayRecord(small(0).state_dict())
    nodes = [NODE_ID_BASE, NODE_ID_BASE + 1]
    strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid(nodes))
    _, metrics = strategy.aggregate_train(1, [reply(small(0), 0), reply(small(1), 1)])
    assert metrics["bytes-down"] == 2 * arrays.count_bytes()
    assert metrics["bytes-up"] == 2 * arrays.count_bytes()


# --------------------------------------------------------------------------------------------------
# The ClientApp, in process


def test_client_app_trains_and_injected_faults_are_left_out() -> None:
    settings = FederatedSettings(
        width=0.25, limit=1200, partition="iid", init="different", faults="1:raise,2:nan,3:arch"
    )
    global_model = settings.global_model()
    replies = client_replies(settings, 5, ArrayRecord(global_model.state_dict()))
    assert replies[1].has_error() and "injected failure" in replies[1].error.reason
    assert replies[0].content["metrics"]["num-examples"] == 240
    strategy = OTFusion(global_model, "paper-wts")
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["clients-fused"] == 2 and metrics["excluded-failed"] == 1
    assert metrics["excluded-non-finite"] == 1 and metrics["excluded-architecture"] == 1
    assert arrays is not None


def test_the_flower_app_project_runs_the_module_level_apps_from_its_run_config() -> None:
    """scripts/flower-app (what `flwr run` reads): its components load, its config is every
    setting, and the module-level ClientApp trains from a run_config built from it."""
    from pathlib import Path

    from flwr.app import Context
    from flwr.supercore import object_ref

    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")

    project = Path(__file__).parent.parent / "scripts" / "flower-app" / "pyproject.toml"
    flwr_table = tomllib.loads(project.read_text())["tool"]["flwr"]["app"]
    config = flwr_table["config"]
    assert set(config) == set(FederatedSettings().to_run_config())
    for component in flwr_table["components"].values():
        assert object_ref.validate(component, check_module=True)[0], component
    from otfuse.flower.apps import client_app

    run_config = {**config, "limit": 600, "width": 0.25, "partition": "iid"}
    context = Context(
        run_id=0, node_id=NODE_ID_BASE, state=RecordDict(), run_config=run_config,
        node_config={"partition-id": 1, "num-partitions": 3},
    )  # fmt: skip
    global_model = FederatedSettings.from_run_config(run_config).global_model()
    out = client_app(train_message(ArrayRecord(global_model.state_dict()), NODE_ID_BASE), context)
    assert out.content["metrics"]["num-examples"] == 200


def test_settings_from_run_config() -> None:
    settings = FederatedSettings.from_run_config(
        {"local-epochs": 3, "alpha": 1, "server-eval": "false"}
    )
    assert settings.local_epochs == 3 and settings.alpha == 1.0 and settings.server_eval is False
    assert FederatedSettings.from_run_config(settings.to_run_config()) == settings
    with pytest.raises(SettingsError, match="unknown run-config key 'epochs'"):
        FederatedSettings.from_run_config({"epochs": 3})
    with pytest.raises(SettingsError, match="must be int"):
        FederatedSettings.from_run_config({"rounds": "three"})
    with pytest.raises(SettingsError, match="unknown partition"):
        FederatedSettings(partition="shards")
    with pytest.raises(SettingsError, match="refit-rounds must be 0"):
        FederatedSettings.from_run_config({"refit-rounds": -1})
    with pytest.raises(SettingsError, match="faults must look like"):
        FederatedSettings(faults="1:explode")
    with pytest.raises(Exception, match="unknown recipe"):
        FederatedSettings(recipe="magic")
    with pytest.raises(SettingsError, match="recipe 'data' reads data: set server-samples"):
        FederatedSettings(recipe="data")


class InProcessGrid(FakeGrid):
    """The Grid that ``Strategy.start`` drives, delivering every message to the ClientApp in this
    process (client k: node NODE_ID_BASE + k)."""

    def __init__(self, app: object, num_clients: int) -> None:
        from flwr.app import Context

        super().__init__([NODE_ID_BASE + k for k in range(num_clients)])
        self.app = app
        self.contexts = {
            NODE_ID_BASE + k: Context(
                run_id=1,
                node_id=NODE_ID_BASE + k,
                state=RecordDict(),
                run_config={},
                node_config={"partition-id": k, "num-partitions": num_clients},
            )  # fmt: skip
            for k in range(num_clients)
        }

    def send_and_receive(self, messages: list[Message], *, timeout: float | None = None) -> list:
        return [self.app(m, self.contexts[m.metadata.dst_node_id]) for m in messages]


def test_flower_strategy_loop_in_process_fuses_and_improves() -> None:
    """Flower's own ``Strategy.start`` loop (configure, aggregate, evaluate) for 2 rounds of 3
    clients, with the ClientApp called in process: every round is fused, not averaged, and the
    global model improves."""
    from otfuse.flower.apps import _evaluate_fn, build_strategy, make_client_app

    settings = FederatedSettings(
        width=0.5, limit=3000, partition="iid", init="different", recipe="paper-wts",
        batch_size=32, rounds=2,
    )  # fmt: skip
    model = settings.global_model()
    strategy = build_strategy(settings, model)
    result = strategy.start(
        grid=InProcessGrid(make_client_app(settings), 3),
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=2,
        evaluate_fn=_evaluate_fn(settings),
    )
    assert [r.fused for r in strategy.reports] == [True, True]
    assert strategy.reports[0].distance_to_average > 0.1
    accuracy = {r: m["accuracy"] for r, m in result.evaluate_metrics_serverapp.items()}
    assert accuracy[2] > accuracy[1] > accuracy[0] + 20
    assert result.train_metrics_clientapp[2]["clients-fused"] == 3


# --------------------------------------------------------------------------------------------------
# Flower's simulation engine (Ray)


# Ray's start-up makes this the slowest test: 30 s on a quiet 2-core machine, 75 s on a loaded one
def test_simulation_on_the_ray_engine_fuses_and_improves() -> None:
    """3 clients, 2 rounds through ``run_simulation`` on the Ray backend: every round is fused
    (round 1 from different initialisations: far from FedAvg's average) and the global model's
    test accuracy rises."""
    from otfuse.flower import simulate

    settings = FederatedSettings(
        width=0.5, limit=6000, partition="iid", init="different", local_epochs=1, rounds=2,
        recipe="paper-wts", lr=0.05, batch_size=32,
    )  # fmt: skip
    run = simulate(settings, num_clients=3)
    assert [r.fused for r in run.reports] == [True, True]
    assert [r.server_round for r in run.reports] == [1, 2]
    assert run.reports[0].distance_to_average > 0.1  # fused, not averaged
    assert all(c.accepted for r in run.reports for c in r.clients)
    assert run.train_metrics[1]["clients-fused"] == 3
    assert run.accuracy[2] > run.accuracy[1] > run.accuracy[0] + 20


# --------------------------------------------------------------------------------------------------
# The experiment's bookkeeping (the experiment itself takes minutes: `otfuse experiment federated`)


def fake_results() -> dict:
    from otfuse.experiments import federated

    methods = {
        label: {"accuracy": acc, "seconds": 1.0}
        for label, acc in [("best client", 60.0), ("mean client", 40.0),
                           ("prediction ensemble", 70.0), ("FedAvg", 30.0)]
    }  # fmt: skip
    methods.update({label: {"accuracy": 65.0, "seconds": 2.0} for label in federated.OT_METHODS})
    case = {"examples": [1, 2], "clients": [60.0, 20.0], "train_seconds": 1.0, "methods": methods}
    curve = lambda accs: {  # noqa: E731
        "accuracy": {str(r): a for r, a in enumerate(accs)},
        "bytes_down": {str(r): 1000 for r in range(1, len(accs))},
        "bytes_up": {str(r): 1000 for r in range(1, len(accs))},
        "fusion_seconds": {str(r): 0.5 for r in range(1, len(accs))},
        "fused": {str(r): 1 for r in range(1, len(accs))},
        "seconds": 9.0,
    }
    return {
        "quick": True,
        "setup": vars(federated.QUICK) | {},
        "clients": 10,
        "num_samples": 400,
        "seconds": 5.0,
        "info": {"command": "otfuse experiment federated --quick"},
        "oneshot": {init: {"0.5": case, "0.1": case} for init in federated.INITS},
        "rounds": {
            "FedAvg": curve([10.0, 50.0, 60.0, 70.0]),
            "otfuse data-free, targets ensemble": curve([10.0, 55.0, 70.0, 69.8]),
            "otfuse data, targets ensemble": curve([10.0, 49.0, 59.0, 71.0]),
        },
    }


def test_experiment_targets_and_report(tmp_path) -> None:
    from otfuse.experiments import federated

    results = fake_results()
    targets = {t.name: t for t in federated.check_targets(results)}
    free = "OT data-free, targets ensemble"
    assert targets[f"{free}: one-shot, different inits, alpha 0.5: fused - FedAvg"].value == 35.0
    assert targets[f"{free}: one-shot, different inits, alpha 0.5: fused - best client"].met
    rounds = "otfuse data-free, targets ensemble: rounds: "
    assert targets[rounds + "lowest (otfuse - FedAvg) over rounds"].value == pytest.approx(-0.2)
    spare = rounds + "rounds FedAvg needs to reach its final accuracy minus rounds otfuse needs"
    assert targets[spare].value == 1  # 70% at round 2 against FedAvg's round 3
    data = "otfuse data, targets ensemble: rounds: lowest (otfuse - FedAvg) over rounds"
    assert not targets[data].met  # 1 point below FedAvg at rounds 1 and 2
    results["targets"] = [t.as_dict() for t in targets.values()]
    federated.write_outputs(tmp_path, results)
    report = (tmp_path / "report.md").read_text()
    assert "## (b) 3 rounds" in report and "NOT MET" in report
    assert (tmp_path / "oneshot.png").stat().st_size > 0 and (tmp_path / "rounds.png").exists()


def test_coverage_targets_fuse_with_the_class_counts_clients_report(monkeypatch) -> None:
    import otfuse.flower.strategy as strategy_module

    seen = {}
    real = strategy_module.fuse

    def spy(models, config, **kwargs):
        seen.update(kwargs)
        return real(models, config, **kwargs)

    monkeypatch.setattr(strategy_module, "fuse", spy)
    sample = torch.randn(64, 1, 28, 28)
    config = FederatedSettings(recipe="data", targets="coverage", server_samples=64).fusion_config()
    strategy = OTFusion(small(0), config, server_data=sample, guard=False)
    counts = [[50.0] * 5 + [0.0] * 5, [0.0] * 5 + [50.0] * 5, [10.0] * 10]
    replies = [reply(small(k), k, **{"class-counts": c}) for k, c in enumerate(counts)]
    replies.insert(1, reply(small(3), 3))  # no class counts: left out
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["fused"] == 1
    assert metrics["clients-fused"] == 3 and metrics["excluded-malformed"] == 1
    assert seen["class_counts"] == counts
    # counts that do not fit the class scores: that client is left out
    odd = [*replies[:3], reply(small(5), 5, **{"class-counts": [5.0, 5.0]})]
    _, metrics = OTFusion(small(0), config, server_data=sample).aggregate_train(2, odd)
    assert metrics["clients-fused"] == 2 and metrics["excluded-malformed"] == 2
    # the train messages ask for the counts only with targets coverage
    grid = FakeGrid([NODE_ID_BASE, NODE_ID_BASE + 1])
    for strategy_, asked in ((strategy, True), (OTFusion(small(0), "paper-wts"), False)):
        sent = strategy_.configure_train(
            1, ArrayRecord(small(0).state_dict()), ConfigRecord(), grid
        )
        assert all(bool(m.content["config"].get("class-counts")) == asked for m in sent)


def test_clients_report_the_examples_of_each_class_when_asked() -> None:
    settings = FederatedSettings(width=0.25, limit=1200, partition="dirichlet", alpha=0.1)
    start = ArrayRecord(settings.global_model().state_dict())
    unasked = client_replies(settings, 2, start)
    assert all("class-counts" not in r.content["metrics"] for r in unasked)
    replies = client_replies(settings, 2, start, ask_counts=True)
    for r in replies:
        counts = r.content["metrics"]["class-counts"]
        assert len(counts) == 10 and sum(counts) == r.content["metrics"]["num-examples"]
    assert FederatedSettings(targets="coverage").targets == "coverage"


def test_experiment_oneshot_case_fuses_the_same_replies_with_coverage(monkeypatch) -> None:
    from otfuse.experiments import federated

    monkeypatch.setattr(federated, "CLIENTS", 3)
    monkeypatch.setattr(
        federated, "OT_METHODS", {"OT data, targets coverage": ("data", "coverage")}
    )
    settings = FederatedSettings(
        width=0.25, limit=900, partition="dirichlet", alpha=0.1, init="different",
        recipe="data", server_samples=64, rounds=1,
    )  # fmt: skip
    case = federated.oneshot_case(settings, settings.test_data(), progress=False)
    fused = case["methods"]["OT data, targets coverage"]
    assert 0.0 <= fused["accuracy"] <= 100.0 and len(case["examples"]) == 3
    assert case["train_seconds"] > 0
