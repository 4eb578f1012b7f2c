"""Distributed training: MultiWorkerMirroredStrategy with two worker processes on loopback, the
mirrored strategy in process, and the per-replica gradient scaling."""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.test_training import TINY, tiny_config
from tfx_xmatch import training
from tfx_xmatch.config import ConfigError


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


# Failures of the test machine, not of the code under test: a worker starved of CPU for longer
# than the coordination service's heartbeat timeout is declared dead by its peer, and a port
# picked as free can be taken by another process before the worker binds it.
MACHINE_FAILURES = ("heartbeat", "Heartbeat", "Address already in use")


def _train_on_two_workers(run_dir, overrides):
    """Runs `xmatch train --strategy multi_worker` as two loopback worker processes and returns
    each worker's (exit code, stdout, stderr)."""
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    command = [sys.executable, "-m", "tfx_xmatch.cli", "train", "--strategy", "multi_worker",
               "--run-dir", str(run_dir)]
    for override in overrides:
        command += ["--set", override]
    workers = []
    for index in range(2):
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
               "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
        workers.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for worker in workers:
            stdout, stderr = worker.communicate(timeout=420)
            outputs.append((worker.returncode, stdout, stderr))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    return outputs


def test_two_workers_train_one_model_that_evaluates(tmp_path):
    overrides = [*TINY, "train.epochs=3", "train.early_stopping_patience=0"]
    outputs = _train_on_two_workers(tmp_path / "run", overrides)
    if any(code != 0 and any(word in stderr for word in MACHINE_FAILURES) for code, _, stderr in outputs):
        # One retry, in a fresh run directory on fresh ports; any other failure fails at once.
        shutil.rmtree(tmp_path / "run", ignore_errors=True)
        outputs = _train_on_two_workers(tmp_path / "run", overrides)
    for index, (code, stdout, stderr) in enumerate(outputs):
        assert code == 0, f"worker {index} failed:\n{stderr[-3000:]}"
        assert "test" in stdout
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and not (run / ".workers").exists() and not (run / "backup").exists()
    # The chief's saved model loads in a plain process and evaluates to the recorded metrics.
    config = tiny_config("train.epochs=3")
    split = training.prepare_split(config)
    model = training.load_model(run / "model")
    test = training.evaluate(model, split, "test", config)
    np.testing.assert_allclose(test["HR@10"], metrics["test"]["HR@10"], rtol=1e-5)
    assert test["HR@10"] > 0


def test_mirrored_strategy_trains_in_process(tmp_path):
    metrics = training.train(tiny_config("train.epochs=2", "train.strategy=mirrored"), tmp_path)
    assert metrics["epochs"] == 2 and (tmp_path / "model" / "config.json").exists()


def test_multi_worker_refuses_a_time_budget_and_a_missing_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker",
                                                                                                  "index": 0}}))
    with pytest.raises(ConfigError, match="max_train_seconds cannot be used with train.strategy=multi_worker"):
        training.train(tiny_config("train.strategy=multi_worker", "train.max_train_seconds=60"), tmp_path / "a")
    monkeypatch.delenv("TF_CONFIG")
    with pytest.raises(ConfigError, match="needs the cluster in the TF_CONFIG"):
        training.make_strategy("multi_worker")
    with pytest.raises(ConfigError, match="train.strategy must be one of"):
        training.make_strategy("tpu")


SCALING_CHECK = """
import numpy as np, tensorflow as tf
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)
import tfx_xmatch
from tfx_xmatch.models import TwoTower

rng = np.random.default_rng(0)
history = rng.integers(1, 31, size=(8, 6)).astype(np.int32)  # no padding: equal positions per row

def one_step(strategy, rows=8):
    batch = {"history": history[:rows], "next_items": np.roll(history[:rows], -1, axis=1)}
    with strategy.scope():
        tf.keras.utils.set_random_seed(0)
        model = TwoTower(num_items=30, embedding_dim=8, max_length=6, num_blocks=1, dropout=0.0)
        model.compile(optimizer=tf.keras.optimizers.SGD(1.0))
        model({"history": history})
        before = [w.numpy().copy() for w in model.trainable_variables]
    data = tf.data.Dataset.from_tensor_slices(batch).batch(rows)
    trained = model.fit(data, epochs=1, verbose=0).history["total_loss"][-1]
    evaluated = model.evaluate(data, verbose=0, return_dict=True)["total_loss"]
    return [w.numpy() - b for w, b in zip(model.trainable_variables, before)], (trained, evaluated)

single, single_losses = one_step(tf.distribute.OneDeviceStrategy("/cpu:0"))
mirrored, mirrored_losses = one_step(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
ratio = sum(np.abs(m).sum() for m in mirrored) / sum(np.abs(s).sum() for s in single)
error = max(np.abs(m - s).max() for m, s in zip(mirrored, single))
# The reported losses: two replicas' halves average to the whole batch's loss (equal positions).
loss_error = max(abs(m - s) / s for m, s in zip(mirrored_losses, single_losses))
# A batch of 3 rows splits 2 + 1: each replica weighs its mean by its share of the rows.
single, single_losses = one_step(tf.distribute.OneDeviceStrategy("/cpu:0"), rows=3)
mirrored, mirrored_losses = one_step(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), rows=3)
uneven_error = max(np.abs(m - s).max() for m, s in zip(mirrored, single))
uneven_loss_error = max(abs(m - s) / s for m, s in zip(mirrored_losses, single_losses))

# Quantizer state assigned in replica context (initialisation, restarts) must agree on every
# replica even when each replica sees different vectors.
from tfx_xmatch.layers import ResidualQuantizer
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    quantizer = ResidualQuantizer(num_levels=2, num_codewords=4, dead_code_threshold=0.5)
    quantizer.build(tf.TensorShape([None, 8]))
vectors = strategy.experimental_distribute_values_from_function(
    lambda context: tf.random.normal([16, 8], seed=context.replica_id_in_sync_group))
step = tf.function(lambda v: strategy.run(lambda x: quantizer(x, training=True)["codes"], args=(v,)))
for _ in range(3):
    step(vectors)
copies = [v.numpy() for v in quantizer.codebooks.values]
spread = max(np.abs(c - copies[0]).max() for c in copies)
print(ratio, error, spread, loss_error, uneven_error, uneven_loss_error)
"""


def test_the_differentiated_loss_is_divided_by_the_replicas_in_sync_and_codebooks_agree():
    """Two replicas each taking half the batch must take the one-device step and report the
    one-device loss: Keras sums the replicas' gradients and logs, so an unscaled per-replica mean
    loss would take twice the step and show twice the loss."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", SCALING_CHECK], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ratio, error, spread, loss_error, uneven_error, uneven_loss_error = map(
        float, result.stdout.strip().splitlines()[-1].split())
    assert abs(ratio - 1.0) < 1e-3 and error < 1e-5, (ratio, error)
    # Replicas with 2 and 1 rows take the one-device step of the 3 rows (the halves' plain mean
    # would count the lone row twice) and report its loss.
    assert uneven_error < 1e-5 and uneven_loss_error < 1e-5, (uneven_error, uneven_loss_error)
    assert spread == 0.0, f"the replicas' RQ-VAE codebooks differ by {spread}"
    # Keras sums what the replicas report: unscaled, fit and evaluate showed twice the loss.
    assert loss_error < 1e-5, f"the reported loss on two replicas is off by {loss_error:.1%}"


SEQUENTIAL_MODELS = """
import json, pathlib, tempfile
import tensorflow as tf
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)
from tests.test_training import tiny_config
from tfx_xmatch import training

trainable = sum(len(s) >= 2 for s in training.prepare_split(tiny_config()).train_sequences)


class Steps(tf.keras.callbacks.Callback):
    count = 0

    def on_train_batch_end(self, batch, logs=None):
        Steps.count += 1


results = {}
# A last batch of one row leaves a replica with nothing; one of three splits it 2 + 1.
for name, short, extra in [("two_tower", 1, []), ("sparcode", 3, []), ("sparc", 1, []),
                           ("t2diff", 3, ["model.user_tower=mixed_attention"])]:
    config = tiny_config("train.epochs=1", "train.strategy=mirrored", f"model.name={name}",
                         f"train.batch_size={trainable - short}", *extra)
    Steps.count = 0
    run_dir = pathlib.Path(tempfile.mkdtemp())
    metrics = training.train(config, run_dir, callbacks=[Steps()])
    loss = json.loads((run_dir / "history.json").read_text())["epochs"][0]["loss"]
    results[name] = [metrics["epochs"], training.make_strategy("mirrored").num_replicas_in_sync, Steps.count, loss]
print(json.dumps(results))
"""


def test_every_model_trains_on_two_replicas_one_after_another_in_one_process():
    """Each model kind takes mirrored steps on two replicas through `training.train`, all in one
    process: a fresh MirroredStrategy per model restarted the collective numbering and the second
    model's all-reduce aborted with a shape mismatch (tensorflow/tensorflow#62790).

    Each run's last batch leaves a replica empty or splits unevenly: the empty replica's mean over
    no positions once made the whole epoch's logged loss NaN, and train then dropped the last
    batch under several replicas, which never trained on up to a batch of examples per epoch."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", SEQUENTIAL_MODELS], capture_output=True, text=True, env=env,
                            timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(results) == {"two_tower", "sparcode", "sparc", "t2diff"}, results
    for name, (epochs, replicas, steps, loss) in results.items():
        assert (epochs, replicas) == (1, 2), (name, results)
        # One epoch of 2 batches (1 step if the short last batch were dropped).
        assert steps == 2, f"{name}: {steps} steps: the short last batch was dropped"
        assert np.isfinite(loss), (name, results)


def test_a_strategy_is_made_once_per_process(monkeypatch):
    made = []
    monkeypatch.setattr(training, "_STRATEGIES", {})
    monkeypatch.setattr(training.tf.distribute, "MirroredStrategy", lambda: made.append(object()) or made[-1])
    assert training.make_strategy("mirrored") is training.make_strategy("mirrored") is made[0]
    assert len(made) == 1


PLAIN_FIT = """
import json
import numpy as np, tensorflow as tf
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)
import tfx_xmatch
from tfx_xmatch.models import SPARC, SparCode, T2Diff, TwoTower

rng = np.random.default_rng(0)
# 65 rows in batches of 16: the last batch of one row leaves the second replica with nothing.
history = rng.integers(1, 31, size=(65, 12)).astype(np.int32)
data = tf.data.Dataset.from_tensor_slices({"history": history, "next_items": np.roll(history, -1, axis=1)}).batch(16)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
losses = {}
for model_class, options in [(SparCode, {"num_codewords": 16, "num_query_tokens": 2}),
                             (SparCode, {"num_codewords": 16, "num_query_tokens": 2, "tokenizer": "slots"}),
                             (SPARC, {"num_codewords": 8, "num_levels": 2}), (T2Diff, {}), (TwoTower, {}),
                             (TwoTower, {"loss": "sampled_softmax"})]:
    with strategy.scope():
        # One block: each replica traces the model, and what is checked does not need a second.
        model = model_class(num_items=30, embedding_dim=8, max_length=12, num_blocks=1, **options)
        model.compile(optimizer=tf.keras.optimizers.Adam(1e-2))
    history_ = model.fit(data, epochs=2, verbose=0).history
    evaluated = model.evaluate(data, verbose=0, return_dict=True)["total_loss"]
    name = model_class.__name__ + "".join(f"-{options[key]}" for key in ("tokenizer", "loss") if key in options)
    losses[name] = [strategy.num_replicas_in_sync, history_["total_loss"][-1], evaluated]
print(json.dumps(losses))
"""


def test_every_model_fits_under_a_users_own_two_replica_mirrored_strategy():
    """The TFRS way, without our training loop: build and compile under the strategy's scope,
    then model.fit and model.evaluate. SparCode used to build its quantizer inside the first
    train step, which failed on two replicas ("You must feed a value for placeholder tensor"),
    the sampled-softmax two-tower's Keras loss refused to reduce under a strategy, and every
    model failed the last step of a dataset whose last batch left a replica empty ("a batch has
    no target")."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", PLAIN_FIT], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(losses) == {"SparCode", "SparCode-slots", "SPARC", "T2Diff", "TwoTower", "TwoTower-sampled_softmax"}
    for name, (replicas, loss, evaluated) in losses.items():
        assert replicas == 2 and np.isfinite(loss) and np.isfinite(evaluated), (name, losses)
