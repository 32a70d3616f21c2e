"""Stage 3 gates: shapes, gradients, the paper's formula, and that each variant learns to
trust the right source when a cue in its inputs says which one is right."""
import pytest
import torch
import torch.nn.functional as F

from models.gates import GATES, ConcatLinearGate, build_gate, gate_weights
from utils.errors import UserError


def _inputs(batch: int, num_classes: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    answers = torch.randint(0, num_classes, (batch,), generator=gen)
    vlm_signal = F.one_hot(answers, num_classes).float()
    vlm_signal[0] = 0  # an unparseable answer
    return vlm_signal, torch.randn(batch, num_classes, generator=gen)


@pytest.mark.parametrize("name", list(GATES))
@pytest.mark.parametrize("num_classes", [2, 4, 8])
def test_gate_shape_and_gradients(name, num_classes):
    torch.manual_seed(0)
    gate = build_gate(name, num_classes)
    vlm_signal, head_logits = _inputs(5, num_classes)
    logits = gate(vlm_signal, head_logits)
    assert logits.shape == (5, num_classes)
    F.cross_entropy(logits, torch.arange(5) % num_classes).backward()
    for param_name, param in gate.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, param_name


def test_concat_linear_is_one_linear_layer_on_the_concatenation():
    gate = ConcatLinearGate(3)
    vlm_signal, head_logits = _inputs(4, 3)
    weight, bias = gate.linear.weight.detach(), gate.linear.bias.detach()
    expected = torch.cat([vlm_signal, head_logits], dim=1) @ weight.T + bias
    torch.testing.assert_close(gate(vlm_signal, head_logits), expected)
    # Column block j < C multiplies the VLM's one-hot: a one-hot answer selects column j.
    torch.testing.assert_close(gate(torch.eye(3)[[1]], torch.zeros(1, 3))[0], weight[:, 1] + bias)


def _conflict_task(n: int, num_classes: int, seed: int):
    """Exactly one source is right per sample; the head's confidence tells which.

    Half the samples: the head is right and confident (margin 5 on the true class), the VLM
    answers another class. Other half: the VLM is right and the head hesitates (margin 1 on a
    wrong class). Each source alone is right about half the time.
    """
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    wrong = (labels + torch.randint(1, num_classes, (n,), generator=gen)) % num_classes
    head_right = torch.rand(n, generator=gen) < 0.5
    vlm_answer = torch.where(head_right, wrong, labels)
    head_class = torch.where(head_right, labels, wrong)
    margin = torch.where(head_right, 5.0, 1.0)
    head_logits = 0.3 * torch.randn(n, num_classes, generator=gen)
    head_logits[torch.arange(n), head_class] += margin
    return F.one_hot(vlm_answer, num_classes).float(), head_logits, labels


@pytest.fixture
def single_thread():
    # These tensors are tiny: thread start-up would cost more than the maths on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train_on_conflicts(name: str):
    """A gate trained (full batch, Adam) on the conflict task; returns it and a test split."""
    vlm_signal, head_logits, labels = _conflict_task(1500, 4, seed=0)
    torch.manual_seed(0)
    gate = build_gate(name, 4)
    optimizer = torch.optim.Adam(gate.parameters(), lr=0.05)
    for _ in range(300):
        optimizer.zero_grad()
        F.cross_entropy(gate(vlm_signal, head_logits), labels).backward()
        optimizer.step()
    return gate, _conflict_task(500, 4, seed=1)


@pytest.mark.parametrize("name", list(GATES))
def test_gate_learns_which_source_to_trust(name, single_thread):
    gate, (vlm_signal, head_logits, labels) = _train_on_conflicts(name)
    with torch.no_grad():
        gate_acc = (gate(vlm_signal, head_logits).argmax(1) == labels).float().mean().item()
    vlm_acc = (vlm_signal.argmax(1) == labels).float().mean().item()
    head_acc = (head_logits.argmax(1) == labels).float().mean().item()
    assert max(vlm_acc, head_acc) < 0.6
    assert gate_acc >= 0.8, (name, gate_acc, vlm_acc, head_acc)


def test_dynamic_weights_favour_the_confident_head(single_thread):
    gate, (vlm_signal, head_logits, labels) = _train_on_conflicts("dynamic_weight")
    head_weight = gate_weights(gate, vlm_signal, head_logits)["head"]
    head_right = head_logits.argmax(1) == labels
    assert head_weight[head_right].mean() > head_weight[~head_right].mean() + 0.3


def test_build_gate_rejects_unknown_name():
    with pytest.raises(UserError, match="concat_linear"):
        build_gate("attention", 4)


@pytest.mark.parametrize("name, keys", [("dynamic_weight", {"vlm", "head"}),
                                        ("moe", {"expert_0", "expert_1", "expert_2"})])
def test_gate_weights_sum_to_one(name, keys):
    vlm_signal, head_logits = _inputs(6, 4)
    weights = gate_weights(build_gate(name, 4), vlm_signal, head_logits)
    assert set(weights) == keys
    assert all(w.shape == (6,) and (w >= 0).all() for w in weights.values())
    torch.testing.assert_close(sum(weights.values()), torch.ones(6))


@pytest.mark.parametrize("name", ["concat_linear", "bilinear", "cross_gate"])
def test_gate_weights_none_without_explicit_weights(name):
    assert gate_weights(build_gate(name, 4), *_inputs(2, 4)) is None
