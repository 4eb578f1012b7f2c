"""ModelManager's version life with a fake loader: the orderings a real load only hits by chance
(a config change while a version is loading, a request holding a retired version) are forced here
with events, so each test is deterministic."""

import threading

import grpc

from tfx_xmatch.serving import errors, model_manager
from tfx_xmatch.serving.model_manager import END, UNLOADING, ModelConfig, ModelManager, VersionPolicy


class FakeServable:
    def __init__(self, model_name: str, version: int, path: str):
        self.model_name, self.version, self.path = model_name, version, path
        self.refs = 0
        self.retired = False
        self.unloaded = threading.Event()
        self.unloads = 0

    def unload(self) -> None:
        self.unloads += 1
        self.unloaded.set()


class BlockingLoader:
    """Loads instantly, except that a load of ``block_version`` waits until ``release`` is set."""

    def __init__(self, block_version: int | None = None):
        self.block_version = block_version
        self.started = threading.Event()
        self.release = threading.Event()
        self.loaded: list[FakeServable] = []

    def __call__(self, model_name: str, version: int, path: str) -> FakeServable:
        if version == self.block_version:
            self.started.set()
            assert self.release.wait(30), "the test never released the blocked load"
        servable = FakeServable(model_name, version, path)
        self.loaded.append(servable)
        return servable


def _versions(base, *versions):
    for version in versions:
        (base / str(version)).mkdir(parents=True)
    return str(base)


def test_a_model_removed_while_a_version_loads_never_publishes_it(tmp_path):
    loader = BlockingLoader(block_version=2)
    base = _versions(tmp_path / "m", 1)
    manager = ModelManager([ModelConfig("m", base)], poll_wait_seconds=0, loader=loader)
    manager.start()
    model = manager.get_model("m")
    assert set(model.serving) == {1}

    _versions(tmp_path / "m", 2)
    poll = threading.Thread(target=manager.poll_once)
    poll.start()
    assert loader.started.wait(30)
    manager.set_configs([])  # the model goes while version 2 is still loading
    assert loader.loaded[0].unloaded.is_set() and model.serving == {}
    loader.release.set()
    poll.join(30)
    assert not poll.is_alive()

    version_2 = loader.loaded[-1]
    assert version_2.version == 2
    assert model.serving == {}, "a removed model published the version that finished loading"
    assert version_2.unloaded.is_set(), "the late version was neither published nor unloaded"
    assert manager.get_model("m") is None and manager.model_names() == []


def test_a_retired_version_unloads_only_when_its_last_request_ends(tmp_path):
    loader = BlockingLoader()
    base = _versions(tmp_path / "m", 1)
    manager = ModelManager([ModelConfig("m", base)], poll_wait_seconds=0, loader=loader)
    manager.start()
    with manager.acquire("m") as held:
        assert held.version == 1
        _versions(tmp_path / "m", 2)
        manager.poll_once()  # latest {num_versions: 1}: 2 replaces 1
        model = manager.get_model("m")
        assert set(model.serving) == {2}
        assert not held.unloaded.is_set(), "unloaded under a request that still holds it"
        assert manager.status("m", 1)[0].state == UNLOADING
        with manager.acquire("m") as fresh:
            assert fresh.version == 2  # new requests already go to the new version
    assert held.unloaded.is_set()
    assert manager.status("m", 1)[0].state == END


def test_a_model_removed_right_after_a_publish_unloads_only_when_its_request_ends(tmp_path):
    """The publish decided under model.lock, but model.removed was read again after that lock:
    a removal in between unloaded the version under a request holding it, and again at its end."""
    loader = BlockingLoader()
    base = _versions(tmp_path / "m", 1)
    manager = ModelManager([ModelConfig("m", base)], poll_wait_seconds=0, loader=loader)
    manager.start()
    model = manager.get_model("m")
    published, resume = threading.Event(), threading.Event()

    class PausingAfterThePublish:
        """model.lock, except that the poll thread pauses once right after releasing the lock it
        published version 2 under: the gap the removal falls into."""

        def __init__(self):
            self._lock = threading.Lock()

        def __enter__(self):
            self._lock.acquire()

        def __exit__(self, *exc):
            self._lock.release()
            if threading.current_thread() is poll and 2 in model.serving and not published.is_set():
                published.set()
                assert resume.wait(30), "the test never resumed the poll"

    model.lock = PausingAfterThePublish()
    _versions(tmp_path / "m", 2)
    poll = threading.Thread(target=manager.poll_once)
    poll.start()
    assert published.wait(30)
    with manager.acquire("m") as held:
        assert held.version == 2
        manager.set_configs([])  # a reload drops the model while the request holds version 2
        resume.set()
        poll.join(30)
        assert not poll.is_alive()
        assert held.unloads == 0, "version 2 was unloaded under a request that holds it"
    assert held.unloads == 1
    assert model.serving == {} and model.statuses[2].state == END


def test_concurrent_config_reloads_run_one_after_the_other(tmp_path):
    """Two apply_configs at once (HandleReloadConfigRequest, the config file watcher) each checked
    and rolled back labels against the other's config: a valid reload got the invalid one's
    FAILED_PRECONDITION, the invalid one OK. As TF Serving serialises them: A passes, B fails."""
    loader = BlockingLoader(block_version=3)
    base = _versions(tmp_path / "m", 1, 2, 3)

    def config(versions, **labels):
        return [ModelConfig("m", base, VersionPolicy("specific", versions=frozenset(versions)),
                            tuple(sorted(labels.items())))]

    manager = ModelManager(config({1, 2}, stable=1), poll_wait_seconds=0, loader=loader)
    manager.start()
    answers = {}

    def reload(name, configs):
        try:
            manager.apply_configs(configs)
            answers[name] = grpc.StatusCode.OK
        except errors.ServingError as error:
            answers[name] = error.code

    valid = threading.Thread(target=reload, args=("valid", config({1, 2, 3}, stable=1, canary=3)))
    invalid = threading.Thread(target=reload, args=("invalid", config({1, 2}, stable=9)))
    valid.start()
    assert loader.started.wait(30)  # the valid reload is loading version 3
    invalid.start()
    invalid.join(0.2)  # time to install its config and wait for the poll, had it not to wait first
    loader.release.set()
    valid.join(30)
    invalid.join(30)
    assert answers == {"valid": grpc.StatusCode.OK, "invalid": grpc.StatusCode.FAILED_PRECONDITION}
    # The refused reload changed the policy but no label: the ones in force are the valid reload's.
    assert manager.get_model("m").config.labels == {"stable": 1, "canary": 3}
    manager.stop()


def test_stop_during_a_background_load_waits_for_it_and_unloads_everything(tmp_path):
    loader = BlockingLoader(block_version=2)
    base = _versions(tmp_path / "m", 1)
    manager = ModelManager([ModelConfig("m", base)], poll_wait_seconds=0.01, loader=loader)
    manager.start()  # version 1 loads in start(); the poller thread then finds version 2
    _versions(tmp_path / "m", 2)
    assert loader.started.wait(30)
    stopper = threading.Thread(target=manager.stop)
    stopper.start()
    stopper.join(0.2)
    assert stopper.is_alive(), "stop() returned while a version was still loading"
    loader.release.set()
    stopper.join(30)
    assert not stopper.is_alive()
    assert manager.get_model("m").serving == {}
    assert all(servable.unloaded.is_set() for servable in loader.loaded)
    assert [servable.version for servable in loader.loaded] == [1, 2]


def test_the_fake_loader_matches_the_real_loaders_signature():
    # The tests above stand in for load_servable; keep them honest about what it takes.
    import inspect

    assert list(inspect.signature(model_manager.load_servable).parameters) == ["model_name", "version", "path"]


def test_a_scann_export_loaded_without_the_scann_ops_says_which_flag_is_missing(tmp_path):
    def loader(model_name, version, path):
        raise ValueError("Op type not registered 'Scann>TensorsToScann' in binary running on host")

    manager = ModelManager([ModelConfig("m", _versions(tmp_path / "m", 1))], poll_wait_seconds=0, loader=loader)
    manager.start()
    (status,) = manager.status("m")
    assert status.state == END and "start the server with --load_modules=scann" in status.error_message


def test_an_unloaded_version_is_freed_at_once_not_at_the_next_garbage_collection(tmp_path):
    """A restored SavedModel is held in reference cycles: an unloaded version (its traced
    functions and what they hold) stayed in memory until Python's cyclic collector next ran, so
    a server rolling a 150 MiB model through versions grew to three times that."""
    import gc

    import tensorflow as tf

    module = tf.Module()
    module.table = tf.Variable(tf.ones([1000, 8]))
    module.serve = tf.function(lambda x: {"y": x @ tf.transpose(module.table)},
                               input_signature=[tf.TensorSpec([None, 8], tf.float32)])
    tf.saved_model.save(module, str(tmp_path / "1"), signatures={"serving_default": module.serve})
    gc.collect()
    gc.disable()  # the collector must not do the work by chance while the test runs
    try:
        servable = model_manager.load_servable("m", 1, str(tmp_path / "1"))
        assert servable.signature("")({"x": tf.ones([2, 8]).numpy()})["y"].shape == (2, 1000)
        servable.unload()
        servable.collection.join(timeout=60)
        left_for_the_collector = gc.collect()  # about 700 objects before
    finally:
        gc.enable()
    assert left_for_the_collector < 50
