"""The core reward interface: shapes, named columns, NaN/inf reporting, composition."""
import numpy as np
import pytest
import torch

from mmrl.train.reward_fn import CombinedReward, evaluate_reward


def length_reward(samples, prompts, metadata):
    return [float(len(s)) for s in samples]


def test_single_column_from_list_numpy_and_tensor():
    s, p = ["a", "bb", "ccc"], ["x"] * 3
    for fn in (length_reward, lambda *a: np.array([1.0, 2.0, 3.0]),
               lambda *a: torch.tensor([1, 2, 3])):
        rb = evaluate_reward(fn, s, p, name="len")
        assert rb.names == ["len"]
        assert rb.values.dtype == torch.float32
        torch.testing.assert_close(rb.values[:, 0], torch.tensor([1.0, 2.0, 3.0]))
        assert rb.valid.all() and rb.num_invalid == 0


def test_named_columns_mapping_and_2d_with_names():
    def two(samples, prompts, metadata):
        return {"fmt": [1.0, 0.0], "acc": torch.tensor([0.5, 1.0])}
    rb = evaluate_reward(two, ["a", "b"], ["p", "p"])
    assert rb.names == ["fmt", "acc"]
    torch.testing.assert_close(rb.column("acc"), torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(rb.weighted_sum({"fmt": 2.0}), torch.tensor([2.5, 1.0]))

    class TwoD:
        names = ["a", "b"]

        def __call__(self, s, p, m):
            return torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    rb = evaluate_reward(TwoD(), ["a", "b"], ["p", "p"])
    assert rb.names == ["a", "b"]
    torch.testing.assert_close(rb.column("b"), torch.tensor([2.0, 4.0]))


def test_nan_and_inf_are_reported_not_used():
    fn = lambda s, p, m: [1.0, float("nan"), float("inf"), 0.0]  # noqa: E731
    rb = evaluate_reward(fn, list("abcd"), list("pppp"), name="r")
    assert rb.valid.tolist() == [True, False, False, True]
    assert rb.num_invalid == 2
    report = rb.invalid_report()
    assert "sample 1" in report and "sample 2" in report and "2 sample(s)" in report
    kept = rb.select(rb.valid)
    assert kept.values[:, 0].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="sample 1"):
        evaluate_reward(fn, list("abcd"), list("pppp"), name="r", on_invalid="raise")


@pytest.mark.parametrize("out, match", [
    ([1.0, 2.0], "returned shape"),
    ("abc", "dtype|numbers|could not"),
])
def test_wrong_outputs_are_clear_errors(out, match):
    with pytest.raises((ValueError, TypeError), match=match):
        evaluate_reward(lambda *a: out, ["a", "b", "c"], ["p"] * 3, name="bad")


def test_mismatched_inputs():
    with pytest.raises(ValueError, match="2 prompts"):
        evaluate_reward(length_reward, ["a", "b", "c"], ["p", "p"])
    with pytest.raises(ValueError, match="metadata"):
        evaluate_reward(length_reward, ["a"], ["p"], [{}, {}])


def test_combined_reward_columns_and_weights():
    comb = CombinedReward({"len": (length_reward, 0.5), "one": lambda s, p, m: [1.0] * len(s)})
    rb = evaluate_reward(comb, ["a", "bbb"], ["p", "p"])
    assert rb.names == ["len", "one"]
    assert comb.weights == {"len": 0.5, "one": 1.0}
    torch.testing.assert_close(rb.weighted_sum(comb.weights), torch.tensor([1.5, 2.5]))
    with pytest.raises(ValueError, match="at least one"):
        CombinedReward({})
    with pytest.raises(TypeError, match="not a callable"):
        CombinedReward({"x": (3, 1.0)})
