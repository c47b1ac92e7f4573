import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxretrieval import losses, sharding
from jaxretrieval.training import checkpointing, optimizers, state, step
from tests.training.helpers import tiny_model, tuple_batch


def _state(variables, optimizer, first_trainable="conv2", mesh=None):
    trainable = state.freeze_before(["conv1", "conv2", "classifier"], first_trainable)
    initial = state.init_train_state(variables, optimizer, trainable)
    return sharding.replicate(initial, mesh or sharding.data_mesh())


def test_split_and_merge_are_inverse_and_freeze_the_early_layers():
    _, variables = tiny_model()
    trainable = state.freeze_before(["conv1", "conv2", "classifier"], "conv2")
    params, frozen = state.split_variables(variables, trainable)
    assert set(params) == {"backbone", "gem"} and set(params["backbone"]) == {"conv2"}
    assert set(frozen["params"]["backbone"]) == {"conv1", "classifier"}
    merged = state.merge_variables(params, frozen)
    assert jax.tree.structure(merged) == jax.tree.structure(variables)
    head_only = state.freeze_before(["conv1", "conv2", "classifier"], "head")
    params, _ = state.split_variables(variables, head_only)
    assert set(params) == {"gem"}
    whole = state.freeze_before(["conv1", "conv2", "classifier"], None)
    params, _ = state.split_variables(variables, whole)
    assert set(params["backbone"]) == {"conv1", "conv2"}
    with pytest.raises(ValueError, match="unknown layer 'conv9'"):
        state.freeze_before(["conv1"], "conv9")


def test_backbone_layer_names_in_forward_order():
    from tests.training.helpers import TinyBackbone

    assert state.backbone_layer_names(TinyBackbone()) == ["conv1", "conv2", "classifier"]


def test_batch_scores_known_values():
    descriptors = jnp.array([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [1.0, 0.0]]])  # (B=2, T=2)
    scenes = jnp.array([[0, 0], [1, 0]])
    scores, labels, valid = step.batch_scores(descriptors, scenes)
    np.testing.assert_allclose(scores, [[1.0, 0.0, 0.6, 1.0], [0.6, 0.8, 1.0, 0.6]], atol=1e-6)
    assert labels.tolist() == [[True, True, False, True], [False, False, True, False]]
    assert valid.tolist() == [[False, True, True, True], [True, True, False, True]]


@pytest.mark.parametrize("name", step.LOSSES)
def test_every_loss_trains_the_tiny_model(name):
    """Loss goes down on a fixed batch; frozen layers and batch stats do not move."""
    model, variables = tiny_model()
    optimizer = optimizers.make_optimizer(learning_rate=1e-2)
    train_state = _state(variables, optimizer)
    kwargs = {"min_score": -1.0} if name == "ap" else {}
    train_step = step.make_train_step(
        step.tuple_batch_loss(model, step.retrieval_loss(name, **kwargs)), optimizer
    )
    batch = tuple_batch()
    first = None
    for _ in range(15):
        train_state, metrics = train_step(train_state, batch)
        first = float(metrics["loss"]) if first is None else first
    assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) < first
    merged = train_state.variables()
    np.testing.assert_array_equal(
        merged["params"]["backbone"]["conv1"]["kernel"],
        variables["params"]["backbone"]["conv1"]["kernel"],
    )
    assert not np.allclose(
        merged["params"]["backbone"]["conv2"]["kernel"],
        variables["params"]["backbone"]["conv2"]["kernel"],
    )
    assert int(train_state.step) == 15


def test_step_compiles_once():
    model, variables = tiny_model()
    optimizer = optimizers.make_optimizer(learning_rate=1e-3)
    traces = []
    loss = step.retrieval_loss("contrastive")

    def counting_loss(d, scenes):
        traces.append(1)  # runs at trace time only
        return loss(d, scenes)

    train_step = step.make_train_step(step.tuple_batch_loss(model, counting_loss), optimizer)
    train_state = _state(variables, optimizer)
    for seed in range(3):
        train_state, _ = train_step(train_state, tuple_batch(seed))
    assert len(traces) == 1


def test_four_devices_match_one_device():
    """The same global batch gives the same loss and parameters on 1 and 4 devices."""
    assert jax.device_count() == 4
    model, variables = tiny_model()
    optimizer = optimizers.make_optimizer(learning_rate=1e-2)
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = sharding.data_mesh(devices)
        train_step = step.make_train_step(
            step.tuple_batch_loss(model, step.retrieval_loss("ap", min_score=-1.0)),
            optimizer,
            mesh=mesh,
        )
        train_state = _state(variables, optimizer, mesh=mesh)
        for seed in range(3):
            train_state, metrics = train_step(train_state, tuple_batch(seed))
        results.append((float(metrics["loss"]), jax.device_get(train_state.trainable)))
    (loss_1, params_1), (loss_4, params_4) = results
    np.testing.assert_allclose(loss_4, loss_1, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params_4, params_1
    )


def test_gem_p_has_its_own_learning_rate_and_no_weight_decay():
    params = {"w": jnp.ones(3), "gem": {"p": jnp.array(3.0)}}
    assert optimizers.parameter_groups(params) == {"w": "default", "gem": {"p": "gem_p"}}
    optimizer = optimizers.make_optimizer(
        learning_rate=0.1, weight_decay=0.5, gem_p_learning_rate_multiplier=10.0
    )
    grads = {"w": jnp.zeros(3), "gem": {"p": jnp.array(1.0)}}
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    # Adam's first step moves by the learning rate: 10 x 0.1 for p, and only weight decay
    # (0.1 * 0.5 * 1) moves w, whose gradient is zero.
    np.testing.assert_allclose(updates["gem"]["p"], -1.0, rtol=1e-5)
    np.testing.assert_allclose(updates["w"], -0.05, rtol=1e-5)


def test_gradient_accumulation_averages_batches():
    params = {"w": jnp.zeros(2)}
    accumulated = optimizers.make_optimizer(
        learning_rate=1.0, weight_decay=0.0, accumulation_steps=2
    )
    single = optax.adam(1.0)
    opt_state = accumulated.init(params)
    updates, opt_state = accumulated.update({"w": jnp.array([1.0, 0.0])}, opt_state, params)
    np.testing.assert_array_equal(updates["w"], 0.0)  # nothing applied after 1 of 2
    updates, opt_state = accumulated.update({"w": jnp.array([3.0, 2.0])}, opt_state, params)
    expected, _ = single.update({"w": jnp.array([2.0, 1.0])}, single.init(params), params)
    np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-6)


def test_learning_rate_schedules():
    cosine = optimizers.learning_rate_schedule(
        learning_rate=1.0, total_steps=110, warmup_steps=10, schedule="cosine"
    )
    assert float(cosine(0)) == 0.0 and float(cosine(5)) == pytest.approx(0.5)
    assert float(cosine(10)) == pytest.approx(1.0) and float(cosine(110)) == pytest.approx(0.0)
    assert float(cosine(60)) == pytest.approx(0.5)
    exponential = optimizers.learning_rate_schedule(
        learning_rate=1.0, total_steps=10, schedule="exponential", decay_rate=0.5
    )
    assert float(exponential(2)) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="schedule must be one of"):
        optimizers.learning_rate_schedule(learning_rate=1.0, total_steps=1, schedule="linear")


def test_checkpoint_round_trip_and_latest(tmp_path):
    model, variables = tiny_model()
    optimizer = optimizers.make_optimizer(learning_rate=1e-2)
    train_step = step.make_train_step(
        step.tuple_batch_loss(model, step.retrieval_loss("triplet")), optimizer
    )
    train_state = _state(variables, optimizer)
    checkpointer = checkpointing.Checkpointer(tmp_path, save_interval_steps=2, max_to_keep=2)
    for seed in range(5):
        train_state, _ = train_step(train_state, tuple_batch(seed))
        checkpointer.save(int(train_state.step), train_state)
    checkpointer.wait_until_finished()
    assert checkpointer.latest_step == 4
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [2, 4]
    restored = checkpointer.restore(_state(variables, optimizer))
    assert int(restored.step) == 4
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.device_get(restored.trainable),
        jax.device_get(checkpointer.restore(train_state, step=4).trainable),
    )
    checkpointer.close()
    empty = checkpointing.Checkpointer(tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="no completed checkpoint"):
        empty.restore(train_state)


def test_saving_a_replicated_state_compiles_nothing(tmp_path):
    """Data-parallel parameters sit on every device; saving them must not compile a
    slice per replica (orbax's replica-parallel default: ~170 compilations, 7-9 s, at a
    MobileNetV2 run's first save), and they must come back replicated."""
    from jax import monitoring

    mesh = sharding.data_mesh()
    assert mesh.size == 4
    replicated = sharding.replicated(mesh)
    rng = np.random.default_rng(0)
    state = {
        "kernel": jax.device_put(rng.normal(size=(3, 3, 8, 16)).astype(np.float32), replicated),
        "bias": jax.device_put(np.arange(16, dtype=np.float32), replicated),
        "step": jax.device_put(np.int32(7), replicated),
    }
    compilations = []

    def listener(event, duration, **kwargs):
        if event.endswith("backend_compile_duration"):
            compilations.append(event)

    monitoring.register_event_duration_secs_listener(listener)
    try:
        checkpointer = checkpointing.Checkpointer(tmp_path)
        checkpointer.save(1, state, force=True)
        checkpointer.wait_until_finished()
    finally:
        monitoring.unregister_event_duration_listener(listener)
    assert compilations == []
    restored = checkpointer.restore(state)
    checkpointer.close()
    for name, value in state.items():
        assert restored[name].sharding.is_equivalent_to(replicated, value.ndim)
        np.testing.assert_array_equal(restored[name], value)


def test_losses_reach_the_library_functions():
    """The tuple adapter passes its keyword arguments to the loss."""
    rng = np.random.default_rng(0)
    d = rng.normal(size=(2, 4, 8)).astype(np.float32)
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    scenes = tuple_batch(batch=2)["scenes"]
    np.testing.assert_allclose(
        step.retrieval_loss("contrastive", margin=0.5)(d, scenes),
        losses.contrastive_loss(d, margin=0.5),
    )
    with pytest.raises(ValueError, match="unknown loss"):
        step.retrieval_loss("hinge")
