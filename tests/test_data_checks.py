"""Bad data is refused before training with a one-line DataError/ConfigError naming the problem and the fix;
valid data passes unchanged and the dataset splits stay bit-identical."""

import hashlib
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, IterableDataset, TensorDataset

from selftune import validation
from selftune.data import _splits, load_dataset
from selftune.data._loaders import load_digits
from selftune.errors import ConfigError, DataError, SelftuneError, SelftuneWarning
from selftune.validation import as_dataset, check_all_targets, check_batch_sizes, check_targets


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and text.strip() == text
    return text


@pytest.fixture
def pair():
    return torch.randn(100, 5), torch.randint(0, 10, (100,))


class Items(Dataset):
    """A map-style dataset over a list of items (anything: pairs, tensors, ...)."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


# ---------------------------------------------------------------------------------------------------
# as_dataset
# ---------------------------------------------------------------------------------------------------
def test_a_valid_pair_becomes_a_tensor_dataset_of_the_same_tensors(pair):
    data = as_dataset(pair, "train")
    assert isinstance(data, TensorDataset) and data.tensors[0] is pair[0] and data.tensors[1] is pair[1]
    same = TensorDataset(*pair)
    assert as_dataset(same, "train") is same
    custom = Items([(torch.zeros(3), 1), (torch.ones(3), 0)])
    assert as_dataset(custom, "val") is custom


def test_data_errors_are_value_errors_and_selftune_errors(pair):
    with pytest.raises(DataError) as err:
        as_dataset((pair[0], pair[1][:99]), "train")
    assert isinstance(err.value, ValueError) and isinstance(err.value, SelftuneError)
    assert err.value.exit_code == 2


def test_nan_inputs_are_counted_and_the_first_row_named(pair):
    x, y = pair
    x[17, 2] = float("nan")
    x[40, 0] = float("nan")
    x[99, 4] = float("nan")
    with pytest.raises(DataError) as err:
        as_dataset((x, y), "train")
    assert one_line(err) == ("train: inputs contain 3 NaN/inf values (first at row 17); "
                             "clean or impute them before training")


@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_infinite_inputs_are_refused(pair, value):
    x, y = pair
    x[63, 1] = value
    with pytest.raises(DataError, match=r"^val: inputs contain 1 NaN/inf value \(first at row 63\)"):
        as_dataset(TensorDataset(x, y), "val")


def test_nan_in_float_targets_is_refused():
    x, y = torch.randn(10, 2), torch.rand(10, 3)
    y[4, 2] = float("nan")
    with pytest.raises(DataError, match=r"^train: targets contain 1 NaN/inf value \(first at row 4\)"):
        as_dataset((x, y), "train")


def test_half_precision_inputs_are_checked_too(pair):
    x = pair[0].half()
    x[5, 0] = float("inf")
    with pytest.raises(DataError, match="first at row 5"):
        as_dataset((x, pair[1]), "train")


def test_the_scan_works_in_chunks_and_counts_across_them(monkeypatch):
    """A chunk of at most CHUNK_ELEMENTS is checked at a time (no full-size temporary), and NaN in
    several chunks are all counted, the first row named exactly."""
    monkeypatch.setattr(validation, "CHUNK_ELEMENTS", 64)  # 64 // 8 = 8 rows per chunk
    seen = []
    real = torch.isfinite

    def spy(t):
        seen.append(t.numel())
        return real(t)

    monkeypatch.setattr(torch, "isfinite", spy)
    x, y = torch.randn(100, 8), torch.randint(0, 3, (100,))
    for row in (19, 20, 57, 99):
        x[row, row % 8] = float("nan")
    with pytest.raises(DataError) as err:
        as_dataset((x, y), "train")
    assert "4 NaN/inf values (first at row 19)" in one_line(err)
    assert max(seen) <= 64 and len(seen) >= 100 // 8


def test_a_large_tensor_is_scanned_without_a_full_size_temporary(monkeypatch):
    seen = []
    real = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: seen.append(t.numel()) or real(t))
    x = torch.randn(3 * validation.CHUNK_ELEMENTS // 16 + 5, 16)
    y = torch.zeros(len(x), dtype=torch.long)
    as_dataset((x, y), "train")  # clean: passes
    x[-1, 3] = float("nan")
    with pytest.raises(DataError, match=rf"1 NaN/inf value \(first at row {len(x) - 1}\)"):
        as_dataset((x, y), "train")
    assert seen and max(seen) <= validation.CHUNK_ELEMENTS


def test_huge_finite_values_are_not_mistaken_for_inf():
    x = torch.full((1000, 4), 3e38)  # their float32 sum overflows, but every value is finite
    as_dataset((x, torch.zeros(1000, dtype=torch.long)), "train")
    as_dataset((x.half().clamp(max=6e4), torch.zeros(1000, dtype=torch.long)), "train")


def test_length_mismatch_names_both_counts(pair):
    x, y = pair
    with pytest.raises(DataError) as err:
        as_dataset((x, y[:99]), "train")
    assert one_line(err) == "train: inputs have 100 rows but targets 99; give one target per input"


@pytest.mark.parametrize("data", [
    (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)),
    TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)),
    Items([]),
], ids=["pair", "tensor-dataset", "dataset"])
def test_empty_data_is_refused(data):
    with pytest.raises(DataError) as err:
        as_dataset(data, "val")
    assert one_line(err) == "val: the dataset is empty (0 examples); give at least one example"


@pytest.mark.parametrize("data, named", [
    ([torch.zeros(3, 2), torch.zeros(3)], "got list; wrap it with TensorDataset"),
    (np.zeros((3, 2)), "got ndarray"),
    (torch.zeros(3, 2), "got Tensor; pass a tuple (inputs, targets)"),
    ({"x": torch.zeros(3)}, "got dict"),
    (None, "got NoneType"),
    ((torch.zeros(3, 2), torch.zeros(3), torch.zeros(3)), "got a tuple of 3 (Tensor, Tensor, Tensor)"),
    ((np.zeros((3, 2)), torch.zeros(3)), "got a tuple of 2 (ndarray, Tensor)"),
    ((torch.zeros(3, 2),), "got a tuple of 1 (Tensor)"),
])
def test_wrong_types_name_the_type_and_what_is_accepted(data, named):
    with pytest.raises(DataError) as err:  # not TypeError / AssertionError
        as_dataset(data, "train")
    text = one_line(err)
    assert text.startswith("train: expected an (inputs, targets) tuple of tensors, a map-style "
                           "torch.utils.data.Dataset or a DataLoader over one, ") and named in text


def test_scalar_tensors_and_one_tensor_datasets_are_refused():
    with pytest.raises(DataError, match="0-dimensional"):
        as_dataset((torch.tensor(1.0), torch.tensor(1)), "train")
    with pytest.raises(DataError, match=r"must hold 2 tensors .* got 1"):
        as_dataset(TensorDataset(torch.zeros(3, 2)), "train")


def test_iterable_and_unsized_datasets_are_refused():
    class Stream(IterableDataset):
        def __iter__(self):
            yield torch.zeros(2), 0

    class NoLen(Dataset):
        def __getitem__(self, i):
            return torch.zeros(2), 0

    with pytest.raises(DataError, match=r"^train: an IterableDataset cannot be indexed"):
        as_dataset(Stream(), "train")
    with pytest.raises(DataError) as err:
        as_dataset(NoLen(), "train")
    assert one_line(err).startswith("train: NoLen has no __len__") and "define __len__" in str(err.value)


def test_other_datasets_check_their_first_example():
    bad = torch.zeros(4)
    bad[2] = float("nan")
    with pytest.raises(DataError) as err:
        as_dataset(Items([(bad, 1), (torch.zeros(4), 0)]), "val")
    assert one_line(err) == ("val: example 0's inputs contain 1 NaN/inf value; clean or impute them before "
                             "training")
    with pytest.raises(DataError, match="example 0's targets contain 1 NaN/inf"):
        as_dataset(Items([(torch.zeros(4), float("inf"))]), "val")
    with pytest.raises(DataError, match=r"example 0 is a Tensor; each example must be an .input, target. pair"):
        as_dataset(Items([torch.zeros(4)]), "val")
    # Only the first example is read: a bad one further on is left to the per-batch check.
    later = Items([(torch.zeros(4), 0), (bad, 1)])
    assert as_dataset(later, "val") is later


def test_a_failing_getitem_becomes_a_one_line_data_error():
    class Broken(Items):
        def __getitem__(self, i):
            raise KeyError("no\nsuch key")

    with pytest.raises(DataError) as err:
        as_dataset(Broken([1, 2]), "train")
    assert one_line(err).startswith("train: reading example 0 failed (KeyError:")
    assert isinstance(err.value.__cause__, KeyError)


def test_reading_the_first_example_leaves_the_random_states_alone():
    class Random(Items):
        def __getitem__(self, i):
            random.random()
            return torch.rand(3), 0

    torch.manual_seed(5)
    random.seed(5)
    expected = torch.rand(3), random.random()
    torch.manual_seed(5)
    random.seed(5)
    as_dataset(Random([None] * 4), "train")
    got = torch.rand(3), random.random()
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]


# ---------------------------------------------------------------------------------------------------
# check_batch_sizes
# ---------------------------------------------------------------------------------------------------
def test_batch_size_larger_than_the_training_set():
    with pytest.raises(DataError) as err:
        check_batch_sizes(100, 50, 128, None)
    assert one_line(err) == ("tuner.batch_size (128) is larger than the training set (100 examples); "
                             "lower it to at most 100")


def test_val_batch_size_larger_than_the_validation_set():
    with pytest.raises(DataError) as err:
        check_batch_sizes(1000, 50, 32, 64)
    assert one_line(err).startswith("tuner.val_batch_size (64) is larger than the validation set (50 examples); "
                                    "set it to at most 50")
    # unset, it is the batch size at most the validation set: a small validation set is one batch
    check_batch_sizes(1000, 50, 64, None)
    check_batch_sizes(1000, 50, 64, 0)


def test_a_validation_set_smaller_than_the_batch_is_one_validation_batch(digits):
    """Unset, tuner.val_batch_size is min(batch_size, validation examples): a user's 20-row validation
    set trains (it used to be refused, even for fixed training) and every hyper step sees all of it."""
    import selftune as st
    from selftune.models import build

    space = st.Space([st.Float("d0", 0.0, 0.9, init=0.3)])
    model = build("mlp", input_shape=digits.input_shape, num_classes=10, hidden=[16], dropout=["d0", None])
    small = torch.utils.data.Subset(digits.val, range(20))
    tuner = st.SelfTuner(st.hypernetize(model, space), digits.train, small, method="delta-stn",
                         settings=st.TunerSettings(batch_size=64, warmup_epochs=0), seed=0)
    assert tuner.val_batch_size == 20
    tuner.fit(1)
    assert tuner.counters.hyper_steps > 0
    with pytest.raises(DataError, match=r"tuner\.val_batch_size \(32\) is larger than the validation set \(20"):
        st.SelfTuner(st.hypernetize(model, space), digits.train, small, method="delta-stn",
                     settings=st.TunerSettings(batch_size=64, val_batch_size=32), seed=0)


def test_batch_sizes_that_fit_pass():
    check_batch_sizes(100, 50, 100, 50)
    check_batch_sizes(100, 50, 50, None)
    check_batch_sizes(1150, 288, 64, 0)
    check_batch_sizes(100, 50, 100, 10)  # a validation batch may be smaller than the training batch


def test_non_positive_batch_size_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        check_batch_sizes(100, 50, 0, None)
    assert err.value.field == "tuner.batch_size"


# ---------------------------------------------------------------------------------------------------
# check_targets
# ---------------------------------------------------------------------------------------------------
def test_labels_in_range_pass():
    check_targets(torch.randn(8, 10), torch.tensor([0, 1, 2, 3, 4, 5, 6, 9]), "train")
    check_targets(torch.randn(4, 35, 100), torch.randint(0, 100, (4, 35)), "train")
    check_targets(torch.randn(3, 1), torch.zeros(3, dtype=torch.long), "train")
    check_targets(torch.randn(8, 10), torch.softmax(torch.randn(8, 10), -1), "val")  # class probabilities


def test_a_label_above_the_outputs_names_the_label_and_the_class_count():
    with pytest.raises(DataError) as err:
        check_targets(torch.randn(8, 10), torch.tensor([0, 1, 2, 3, 12, 5, 6, 7]), "train")
    assert one_line(err) == ("train: label 12 is outside the model's 10 outputs (labels must be 0..9); "
                             "check num_classes or the labels")
    with pytest.raises(DataError, match="label 10 is outside the model's 10 outputs"):  # off by one
        check_targets(torch.randn(2, 10), torch.tensor([10, 0]), "val")


def test_negative_labels_are_refused():
    with pytest.raises(DataError) as err:
        check_targets(torch.randn(4, 10), torch.tensor([0, -1, 2, 3]), "train")
    assert one_line(err).startswith("train: label -1 is negative (labels must be 0..9, or -100 for a label not scored")
    check_targets(torch.randn(2, 10), torch.tensor([-100, 3]), "train")  # PyTorch's ignore_index: not scored
    with pytest.raises(DataError, match=r"label -2 is negative .* or -100 for a label not scored"):
        check_targets(torch.randn(2, 10), torch.tensor([-100, -2]), "train")


def test_sequence_outputs_check_every_token():
    outputs, targets = torch.randn(4, 35, 100), torch.randint(0, 100, (4, 35))
    targets[3, 34] = 100
    with pytest.raises(DataError, match=r"^val: label 100 is outside the model's 100 outputs \(labels must be 0..99\)"):
        check_targets(outputs, targets, "val")
    with pytest.raises(DataError) as err:  # the sequence lengths differ
        check_targets(outputs, torch.randint(0, 100, (4, 20)), "train")
    assert "targets have shape (4, 20) but the model's outputs (4, 35, 100) need targets of shape (4, 35)" \
        in one_line(err)


@pytest.mark.parametrize("outputs, targets, message", [
    (torch.randn(8, 10), torch.randint(0, 10, (8, 1)), "targets have shape (8, 1) but the model's outputs (8, 10) "
                                                       "need targets of shape (8,)"),
    (torch.randn(8, 10), torch.randint(0, 10, (4,)), "the model returned 8 output rows for 4 examples"),
    (torch.randn(8, 10), torch.tensor(3), "targets are a 0-dimensional tensor"),
    (torch.randn(8), torch.randint(0, 10, (8,)), "the model's outputs have shape (8,)"),
    (torch.randn(8, 10), torch.rand(8, 3), "floating-point targets (class probabilities) have shape (8, 3)"),
    (torch.randn(8, 10), torch.randint(0, 10, (8,), dtype=torch.int32), "targets are torch.int32"),
    (torch.randn(8, 10), torch.zeros(8, dtype=torch.bool), "targets are torch.bool"),
])
def test_shapes_and_dtypes_that_cannot_match_are_refused(outputs, targets, message):
    with pytest.raises(DataError) as err:
        check_targets(outputs, targets, "train")
    assert one_line(err).startswith("train: ") and message in str(err.value)


# ---------------------------------------------------------------------------------------------------
# check_all_targets
# ---------------------------------------------------------------------------------------------------
def test_a_bad_label_deep_in_the_data_is_found_before_training(digits):
    x, y = digits.train.tensors
    y = y.clone()
    y[1100] = 10
    data = TensorDataset(x, y)
    check_targets(torch.randn(64, 10), y[:64], "train")  # the first batch alone would not see it
    with pytest.raises(DataError) as err:
        check_all_targets(data, 10, "train")
    assert one_line(err) == ("train: label 10 at row 1100 is outside the model's 10 outputs (labels must be 0..9); "
                             "check num_classes or the labels")


def test_all_targets_reports_the_first_bad_row_and_the_count():
    y = torch.randint(0, 5, (5000,))
    y[3000], y[4000], y[4999] = -2, 7, 9
    with pytest.raises(DataError) as err:
        check_all_targets(TensorDataset(torch.zeros(5000, 1), y), 5, "val")
    assert one_line(err) == ("val: label -2 at row 3000 is negative (labels must be 0..4, or -100 for a label not "
                             "scored, as PyTorch's cross-entropy skips it; 3 labels are out of range); mark ignored "
                             "labels (padding) with -100, map missing ones to a class or drop those examples")


def test_all_targets_of_sequences():
    y = torch.randint(0, 50, (300, 20))
    y[250, 13] = 50
    with pytest.raises(DataError, match="label 50 at row 250 is outside the model's 50 outputs"):
        check_all_targets(TensorDataset(torch.zeros(300, 20, dtype=torch.long), y), 50, "train")
    check_all_targets(TensorDataset(torch.zeros(300, 20, dtype=torch.long), y.clamp(max=49)), 50, "train")


def test_all_targets_skips_other_datasets(digits):
    check_all_targets(Items([(torch.zeros(2), 99)]), 2, "train")  # each batch is checked as drawn instead
    check_all_targets(digits.train, 10, "train")
    check_all_targets(digits.val, 10, "val")
    with pytest.raises(DataError, match="label 9 at row"):  # the real data with a model of too few outputs
        check_all_targets(digits.train, 9, "train")


def test_every_row_of_probability_targets_is_checked_and_multi_label_targets_name_their_loss():
    """Only the first two rows were checked: sparse multi-label data (most rows one tag) trained silently on
    cross-entropy against rows summing to 2-4."""
    y = torch.zeros(200, 4)
    y[torch.arange(200), torch.arange(200) % 4] = 1.0
    check_all_targets(TensorDataset(torch.zeros(200, 3), y), 4, "train")
    y[150, 0] = 1.0
    with pytest.raises(DataError) as err:
        check_all_targets(TensorDataset(torch.zeros(200, 3), y), 4, "train")
    assert "row 150: min 0, sums to 2; 1 such rows" in one_line(err) and "BCEWithLogitsLoss" in str(err.value)
    soft = torch.full((10, 4), 0.25)
    soft[7] = torch.tensor([0.5, 0.5, 0.5, -0.5])
    with pytest.raises(DataError, match=r"row 7: min -0.5, sums to 1; 1 such rows\); floating-point targets that"):
        check_all_targets(TensorDataset(torch.zeros(10, 3), soft), 4, "val")


class Pairs(Dataset):
    """A Dataset of the user's own over tensors (no TensorDataset: not checked whole before training)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


@pytest.mark.parametrize("problem", ["label", "nan", "multi-label"])
def test_a_bad_example_deep_in_a_dataset_of_your_own_is_a_data_error_naming_it(problem):
    """A Dataset subclass has its first examples checked before training; a bad label deep in it was a raw
    IndexError when its batch came up, and a NaN input three roll-backs and a DivergenceError advising a lower
    rate. Each batch is now checked as it is drawn, and the epoch-end scoring too."""
    import selftune as st

    torch.manual_seed(0)
    x = torch.randn(160, 6)
    y = torch.randint(0, 2, (160,))
    if problem == "multi-label":
        y = torch.nn.functional.one_hot(y, 2).float()
        y[100] = 1.0
    elif problem == "label":
        y[100] = 2
    else:
        x[100, 3] = float("nan")
    net = st.hypernetize(torch.nn.Sequential(torch.nn.Linear(6, 8), st.Dropout("d"), torch.nn.Linear(8, 2)),
                         st.Space([st.Float("d", 0.0, 0.9, 0.2)]))
    tuner = st.SelfTuner(net, Pairs(x[:120], y[:120]), Pairs(x[120:], y[120:]), method="delta-stn",
                         settings=st.TunerSettings(batch_size=16))
    with pytest.raises(DataError) as err:
        tuner.fit(2)
    want = {"label": "train: label 2 at example 100 of the dataset is outside the model's 2 outputs",
            "nan": "train: inputs contain NaN/inf values at example 100 of the dataset; clean or impute",
            "multi-label": "example 100 of the dataset: min 1, sums to 2"}[problem]
    assert want in one_line(err) and tuner.divergences == 0
    bad_val = x.clone()
    bad_val[130, 0] = float("inf")
    clean = st.SelfTuner(net, Pairs(x[:100], y[:100]), Pairs(bad_val[120:], y[120:]), method="fixed",
                         settings=st.TunerSettings(batch_size=16))
    with pytest.raises(DataError, match=r"val: inputs contain NaN/inf values at example 10 of the dataset"):
        clean.fit(1)


# ---------------------------------------------------------------------------------------------------
# load_dataset: fractions and subsets
# ---------------------------------------------------------------------------------------------------
def test_a_tiny_val_fraction_is_a_config_error_naming_the_smallest_that_works():
    with pytest.raises(ConfigError) as err:
        load_dataset("digits", val_fraction=0.0001)
    assert err.value.field == "data.val_fraction" and isinstance(err.value, ValueError)
    assert one_line(err) == ("data.val_fraction: 0.0001 of 1438 examples left after the test split leaves 0 for "
                             "validation; use at least 0.0007 (1 example)")
    assert load_dataset("digits", val_fraction=0.0007).sizes() == {"train": 1437, "val": 1, "test": 359}


def test_a_tiny_test_fraction_fails_before_training_not_after():
    with pytest.raises(ConfigError) as err:
        load_dataset("digits", test_fraction=0.0001)
    assert err.value.field == "data.test_fraction"
    assert one_line(err) == ("data.test_fraction: 0.0001 of 1797 examples leaves 0 for testing; "
                             "use at least 0.0006 (1 example)")
    assert load_dataset("digits", test_fraction=0.0006).sizes()["test"] == 1


@pytest.mark.parametrize("kwargs, field, message, fixed", [
    ({"val_fraction": 0.9999}, "data.val_fraction", "leaves 0 for training (at least 1 needed); use at most 0.999",
     {"val_fraction": 0.999}),
    ({"test_fraction": 0.9999}, "data.test_fraction",
     "leaves 0 for training and validation (at least 2 needed); use at most 0.9988",
     {"test_fraction": 0.9988, "val_fraction": 0.5}),  # 2 examples left: half of them for validation
])
def test_fractions_that_leave_no_training_data(kwargs, field, message, fixed):
    with pytest.raises(ConfigError) as err:
        load_dataset("digits", **kwargs)
    assert err.value.field == field and message in one_line(err)
    assert min(load_dataset("digits", **fixed).sizes().values()) >= 1


@pytest.mark.parametrize("kwargs, field", [
    ({"val_fraction": 0.0}, "data.val_fraction"), ({"val_fraction": 1.0}, "data.val_fraction"),
    ({"test_fraction": -0.1}, "data.test_fraction"), ({"val_fraction": "0.2"}, "data.val_fraction"),
    ({"val_fraction": float("nan")}, "data.val_fraction"), ({"test_fraction": True}, "data.test_fraction"),
    ({"train_subset": -5}, "data.train_subset"), ({"test_subset": -1}, "data.test_subset"),
    ({"train_subset": 10.5}, "data.train_subset"),
    ({"train_subset": 1151}, "data.train_subset"), ({"test_subset": 360}, "data.test_subset"),
    ({"val_subset": -2}, "data.val_subset"), ({"val_subset": 289}, "data.val_subset"),
])
def test_bad_fractions_and_subsets_name_their_field(kwargs, field):
    with pytest.raises(ConfigError) as err:
        load_dataset("digits", **kwargs)
    assert err.value.field == field and one_line(err).startswith(field + ": ")


def test_subsets_larger_than_their_split_name_the_largest_that_works():
    with pytest.raises(ConfigError) as err:
        load_dataset("digits", train_subset=5000)
    assert one_line(err) == ("data.train_subset: 5000 is more than the 1150 training examples left after the "
                             "splits; use at most 1150 (0 keeps all)")
    assert load_dataset("digits", train_subset=1150, test_subset=359).sizes() == {"train": 1150, "val": 288,
                                                                                  "test": 359}


def test_a_validation_subset_is_a_prefix_of_the_same_validation_split():
    whole, part = load_dataset("digits"), load_dataset("digits", val_subset=100)
    assert part.sizes() == {**whole.sizes(), "val": 100}
    assert torch.equal(part.val.tensors[0], whole.val.tensors[0][:100])
    assert torch.equal(part.train.tensors[0], whole.train.tensors[0])  # training data and its scaling unchanged


def test_corpus_sequence_length_and_subsets_are_checked(monkeypatch):
    tokens = np.arange(200, dtype=np.int64) % 7
    monkeypatch.setitem(_splits.CORPORA, "tiny", lambda: (tokens, tokens[:41], tokens[:61], list("abcdefg")))
    splits = load_dataset("tiny", seq_len=10, train_subset=19)
    assert splits.sizes() == {"train": 19, "val": 4, "test": 6}
    assert load_dataset("tiny", seq_len=10, val_subset=3).sizes() == {"train": 19, "val": 3, "test": 6}
    with pytest.raises(ConfigError, match=r"^data\.val_subset: 5 is more than the 4 val sequences"):
        load_dataset("tiny", seq_len=10, val_subset=5)
    with pytest.raises(ConfigError) as err:
        load_dataset("tiny", seq_len=41)
    assert err.value.field == "data.seq_len" and "leaves no validation sequence" in one_line(err)
    assert "use at most 40" in str(err.value)
    with pytest.raises(ConfigError, match=r"^data\.train_subset: 20 is more than the 19 train sequences"):
        load_dataset("tiny", seq_len=10, train_subset=20)
    with pytest.raises(ConfigError, match=r"^data\.test_subset: 7 is more than the 6 test sequences"):
        load_dataset("tiny", seq_len=10, test_subset=7)


@pytest.mark.parametrize("n", [3, 4, 7, 10, 57, 1797])
@pytest.mark.parametrize("official_test", [False, True])
def test_every_fraction_either_fills_every_split_or_is_refused_with_a_fix_that_works(monkeypatch, n, official_test):
    x, y = np.random.default_rng(0).random((n, 2)).astype(np.float32), np.arange(n) % 2
    monkeypatch.setitem(_splits.DATASETS, "fake", lambda: (x, y, x[:2], y[:2]) if official_test else (x, y, None, None))
    rng = random.Random(n)
    fractions = [0.5, 0.2, 1e-4, 1 - 1e-4] + [10 ** -rng.uniform(0, 5) for _ in range(8)] \
        + [1 - 10 ** -rng.uniform(0, 5) for _ in range(8)]
    refused = 0
    for _ in range(60):
        kwargs = {"val_fraction": rng.choice(fractions), "test_fraction": rng.choice(fractions)}
        try:
            sizes = load_dataset("fake", **kwargs).sizes()
        except ConfigError as err:
            refused += 1
            suggestion = re.search(r"use at (?:least|most) ([0-9.e-]+)", str(err))
            assert suggestion, str(err)
            kwargs[err.field.removeprefix("data.")] = float(suggestion.group(1))
            try:
                load_dataset("fake", **kwargs)
            except ConfigError as again:
                assert again.field != err.field, (str(err), str(again))
        else:
            assert min(sizes.values()) >= 1, (kwargs, sizes)
    assert refused


# ---------------------------------------------------------------------------------------------------
# load_dataset: valid inputs give the same splits as before the checks
# ---------------------------------------------------------------------------------------------------
def _sha(t: torch.Tensor) -> str:
    return hashlib.sha1(t.numpy().tobytes()).hexdigest()[:12]


@pytest.mark.parametrize("kwargs, sizes, labels", [
    ({}, {"train": 1150, "val": 288, "test": 359},
     {"train": ([8, 2, 0, 6, 4, 7, 1, 3], 5127, "8e86cf724513"),
      "val": ([0, 4, 9, 5, 8, 5, 3, 3], 1281, "4dbd01a35928"),
      "test": ([6, 6, 6, 2, 5, 6, 6, 2], 1662, "8a92789e10af")}),
    ({"val_fraction": 0.1, "test_fraction": 0.3, "split_seed": 3, "train_subset": 500, "test_subset": 100},
     {"train": 500, "val": 126, "test": 100},
     {"train": ([4, 7, 5, 4, 7, 1, 5, 3], 2181, "a23bb33b262e"),
      "val": ([8, 9, 9, 6, 9, 0, 7, 9], 519, "31a541e15145"),
      "test": ([2, 8, 8, 3, 7, 2, 5, 7], 504, "f7df0c4d9bee")}),
])
def test_valid_digits_splits_are_unchanged(kwargs, sizes, labels):
    splits = load_dataset("digits", **kwargs)
    assert splits.sizes() == sizes and splits.num_classes == 10 and splits.input_shape == (1, 8, 8)
    for key, (head, total, sha) in labels.items():
        y = getattr(splits, key).tensors[1]
        assert y[:8].tolist() == head and int(y.sum()) == total and _sha(y) == sha


@pytest.mark.parametrize("kwargs", [
    {}, {"val_fraction": 0.1, "test_fraction": 0.3, "split_seed": 3, "train_subset": 500, "test_subset": 100},
    {"val_fraction": 0.0007, "test_fraction": 0.0006},
])
def test_valid_digits_splits_match_the_split_recipe(kwargs):
    """The same permutation, rounding and prefixes as always: rebuilt here from the raw digits."""
    splits = load_dataset("digits", **kwargs)
    raw_x, raw_y, _, _ = load_digits()
    order = np.random.default_rng(kwargs.get("split_seed", 0)).permutation(len(raw_x))
    n_test = round(kwargs.get("test_fraction", 0.2) * len(order))
    test_idx, order = order[:n_test], order[n_test:]
    n_val = round(kwargs.get("val_fraction", 0.2) * len(order))
    val_idx, train_idx = order[:n_val], order[n_val:]
    train_idx = train_idx[:kwargs.get("train_subset") or None]
    test_idx = test_idx[:kwargs.get("test_subset") or None]
    train_x = raw_x[train_idx]
    mean, std = float(train_x.mean()), float(train_x.std())
    for key, idx in (("train", train_idx), ("val", val_idx), ("test", test_idx)):
        x, y = getattr(splits, key).tensors
        assert torch.equal(y, torch.from_numpy(raw_y[idx]))
        assert torch.equal(x, torch.from_numpy((raw_x[idx] - mean) / std))


def test_a_loss_that_detaches_is_refused_before_training_and_one_that_differentiates_trains():
    import torch.nn.functional as F
    from torch import nn

    import selftune as st

    x = torch.randn(100, 5, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()

    def tuner(loss):
        torch.manual_seed(0)
        net = st.hypernetize(nn.Sequential(nn.Linear(5, 8), st.Dropout("d"), nn.Linear(8, 2)),
                             st.Space([st.Float("d", 0.0, 0.9, 0.2)]))
        return st.SelfTuner(net, (x[:80], y[:80]), (x[80:], y[80:]), method="delta-stn", loss=loss,
                            settings=st.TunerSettings(batch_size=16, lr=0.1))

    with pytest.raises(DataError) as err:
        tuner(lambda out, target: F.cross_entropy(out, target).detach()).fit(1)
    assert one_line(err).startswith("loss: it returned a tensor without a gradient")
    assert tuner(lambda out, target: F.cross_entropy(out, target)).fit(1).history


def test_augmentations_the_inputs_cannot_take_are_refused_before_training(tmp_path):
    """cutout on a table's rows failed at the first step with a traceback (exit 1, a failed run in the
    store); it is now a one-line ConfigError before anything is written, and noise, which takes any
    shape, still trains."""
    from torch import nn

    import selftune as st
    from selftune.augment import Augment, Cutout, Noise
    from selftune.cli import main

    x = torch.randn(100, 13, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()

    def tuner(augment):
        net = st.hypernetize(nn.Sequential(nn.Linear(13, 8), st.Dropout("d"), nn.Linear(8, 2)),
                             st.Space([st.Float("d", 0.0, 0.9, 0.2)]))
        return st.SelfTuner(net, (x[:80], y[:80]), (x[80:], y[80:]), method="delta-stn", augment=augment,
                            settings=st.TunerSettings(batch_size=16, lr=0.1))

    with pytest.raises(ConfigError) as err:
        tuner(Augment([Cutout(length=4.0)]))
    assert one_line(err) == ("augment: cutout cannot augment the training inputs (augmentations need (B, C, H, W) "
                             "images, got shape (2, 13)); remove it from [[augment]] (Python: from the Augment list)")
    assert tuner(Augment([Noise(std=0.1)])).fit(1).history

    own_task = Path(__file__).resolve().parents[1] / "examples" / "own_task.toml"  # a table's rows
    assert main(["run", str(own_task), "--set", "epochs=1", "--set", 'augment=[{op="cutout", length=4}]',
                 "--out", str(tmp_path / "out"), "--store", f"sqlite:///{tmp_path / 's.db'}",
                 "--checkpoint-dir", str(tmp_path / "ck")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_inputs_that_carry_autograd_history_train(pair):
    """Features a user's encoder computed outside torch.no_grad() carry its graph: they are detached on the
    way in (views, the user's tensors untouched), not a "backward through the graph a second time" crash
    at the second step."""
    from torch import nn

    import selftune as st

    torch.manual_seed(0)
    encoder = nn.Linear(5, 8)
    x, y = encoder(pair[0]), pair[1]
    assert as_dataset((x, y), "train").tensors[0].grad_fn is None and x.grad_fn is not None
    assert as_dataset(TensorDataset(x, y), "train").tensors[0].grad_fn is None
    net = st.hypernetize(nn.Sequential(st.Dropout("d"), nn.Linear(8, 10)), st.Space([st.Float("d", 0.0, 0.9, 0.2)]))
    fit = st.SelfTuner(net, (x[:80], y[:80]), (x[80:], y[80:]), method="delta-stn",
                       settings=st.TunerSettings(batch_size=16, lr=0.1)).fit(2)
    assert len(fit.history) == 2 and encoder.weight.grad is None


def test_a_loaders_own_collate_fn_is_used_over_a_tensor_dataset():
    """A DataLoader over a TensorDataset with its own collate_fn (scaling, label mapping): the fast path that
    indexes the tensors directly skipped it, silently, in training, hyper steps and scoring, and the label
    check read the unmapped labels."""
    from torch import nn
    from torch.utils.data import DataLoader, default_collate

    import selftune as st

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(120, 5, generator=g) * 255, torch.randint(1, 4, (120,), generator=g)  # labels 1..3
    calls, seen = [], []

    def collate(batch):
        calls.append(1)
        xs, ys = default_collate(batch)
        return xs / 255, ys - 1

    class Probe(nn.Module):
        def forward(self, v):
            seen.append(float(v.abs().max()))
            return v

    model = nn.Sequential(Probe(), nn.Linear(5, 8), st.Dropout("d"), nn.Linear(8, 3))
    net = st.hypernetize(model, st.Space([st.Float("d", 0.0, 0.9, 0.2)]))
    train, val = (DataLoader(TensorDataset(x[a:b], y[a:b]), collate_fn=collate) for a, b in ((0, 90), (90, 120)))
    tuner = st.SelfTuner(net, train, val, method="delta-stn", settings=st.TunerSettings(batch_size=16, lr=0.1))
    tuner.fit(2)
    assert calls and max(seen) <= 1.0
    assert set(st.score(net, val)) == {"loss", "accuracy"} and max(seen) <= 1.0


def test_outputs_with_their_classes_in_dimension_1_are_read_as_pytorchs_cross_entropy_reads_them():
    """A tagger's ``(B, C, L)`` or a segmentation's ``(B, C, H, W)``, with ``(B, L)`` / ``(B, H, W)`` labels, is
    what ``F.cross_entropy`` takes; the default loss read the classes from the last dimension, so such a
    model was refused with a wrong fix, or, where ``C == L``, trained on positions as classes, silently
    (found by a fuzz round). Where both readings fit, classes last it is, with a warning naming the fix."""
    import warnings

    import torch.nn.functional as F
    from torch import nn

    import selftune as st
    from selftune.errors import SelftuneWarning

    class Tagger(nn.Module):
        def __init__(self, classes):
            super().__init__()
            self.emb, self.drop = nn.Embedding(20, 16), st.Dropout("d")
            self.conv = nn.Conv1d(16, classes, 3, padding=1)

        def forward(self, x):
            return self.conv(self.drop(self.emb(x)).transpose(1, 2))  # (B, C, L)

    torch.manual_seed(0)
    x = torch.randint(0, 20, (64, 8))
    y = x % 5
    net = st.hypernetize(Tagger(5), st.Space([st.Float("d", 0.0, 0.9, 0.2)]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SelftuneWarning)
        tuner = st.SelfTuner(net, (x[:48], y[:48]), (x[48:], y[48:]), settings=st.TunerSettings(batch_size=16, lr=0.5))
    tuner.fit(4)
    scores = st.score(net, (x[48:], y[48:]))
    net.eval()
    assert scores["loss"] == pytest.approx(F.cross_entropy(net(x[48:]), y[48:]).item(), rel=1e-5)
    assert scores["loss"] < 0.5 and scores["accuracy"] > 0.9  # the label is the token id mod 5: learnable
    segmentation = torch.randn(2, 3, 4, 5)
    check_targets(segmentation, torch.randint(0, 3, (2, 4, 5)), "train")
    with pytest.raises(DataError, match=r"label 3 .*3"):
        check_targets(segmentation, torch.full((2, 4, 5), 3), "train")
    with pytest.raises(DataError, match=r"need targets of shape \(2, 3, 4\) \(or \(2, 4, 5\), with the classes in "):
        check_targets(segmentation, torch.zeros(2, 4, 4, dtype=torch.long), "train")
    with pytest.warns(SelftuneWarning, match=r"outputs \(2, 8, 8\) against targets \(2, 8\) are read with the classes "
                                             r"in the last dimension .* pass loss=torch.nn.functional.cross_entropy"):
        check_targets(torch.randn(2, 8, 8), torch.zeros(2, 8, dtype=torch.long), "train")


def test_padding_labels_of_minus_100_are_not_scored_as_pytorchs_cross_entropy_skips_them():
    """A token task's padding marked -100 (F.cross_entropy's ignore_index, what Hugging Face collators write)
    was refused with advice to drop the examples (found by a fuzz round): it is now left out of the loss, the
    smoothed loss, the accuracy and the checks, as PyTorch leaves it out."""
    import torch.nn.functional as F
    from torch import nn

    import selftune as st
    from selftune.objective import Objective

    torch.manual_seed(0)
    logits, target = torch.randn(4, 6, 9), torch.randint(0, 9, (4, 6))
    target[:, 4:] = -100
    assert torch.allclose(Objective().eval_loss(logits, target), F.cross_entropy(logits.reshape(-1, 9),
                                                                                 target.reshape(-1)))
    smoothed = Objective(label_smoothing="s").train_loss(logits, target, lambda name: torch.full((4,), 0.1), [])
    assert torch.allclose(smoothed, F.cross_entropy(logits.reshape(-1, 9), target.reshape(-1), label_smoothing=0.1),
                          atol=1e-6)
    padding = torch.full((4, 6), -100)  # a batch of padding only: 0, with a gradient of 0, not 0/0 = NaN
    for loss in (Objective().train_loss, Objective(label_smoothing="s").train_loss):
        leaf = logits.clone().requires_grad_()
        value = loss(leaf, padding, lambda name: torch.full((4,), 0.1), [])
        value.backward()
        assert float(value) == 0.0 and torch.equal(leaf.grad, torch.zeros_like(leaf))
    check_all_targets(TensorDataset(torch.zeros(4, 6, dtype=torch.long), target), 9, "train")
    with pytest.raises(DataError, match="every label is -100"):
        check_all_targets(TensorDataset(torch.zeros(4, 6, dtype=torch.long), torch.full((4, 6), -100)), 9, "train")

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.drop, self.out = nn.Embedding(12, 16), st.Dropout("d"), nn.Linear(16, 3)

        def forward(self, x):
            return self.out(self.drop(self.emb(x)))

    ids = torch.randint(1, 12, (96, 8))
    tags = ids % 3
    tags[:, 6:] = -100  # the last two positions are padding
    net = st.hypernetize(Tagger(), st.Space([st.Float("d", 0.0, 0.9, 0.2)]))
    st.SelfTuner(net, (ids[:64], tags[:64]), (ids[64:80], tags[64:80]), method="delta-stn",
                 objective=Objective(label_smoothing=0.05), settings=st.TunerSettings(batch_size=16, lr=0.5)).fit(3)
    scores = st.score(net, (ids[80:], tags[80:]))
    net.eval()
    out = net(ids[80:])
    assert scores["loss"] == pytest.approx(F.cross_entropy(out.reshape(-1, 3), tags[80:].reshape(-1)).item(), rel=1e-5)
    kept = tags[80:] != -100
    assert scores["accuracy"] == pytest.approx(float((out.argmax(-1)[kept] == tags[80:][kept]).float().mean()))


def test_one_layout_per_run_where_a_padded_batch_fits_both_readings():
    """A tagger's (B, C, L) scores with variable-length batches: a batch padded to L == C was read classes-last,
    silently, in the middle of a run (found by a fuzz round). The tuner now reads the layout once from its
    first examples, and score() from the first batch whose shapes tell."""
    import warnings

    import torch.nn.functional as F
    from torch import nn

    import selftune as st
    from selftune.errors import SelftuneWarning

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(3, 4, 1))  # (B, 3, L) -> (B, 4 classes, L)
    x6, y6 = torch.randn(8, 3, 6), torch.randint(0, 4, (8, 6))
    x4, y4 = torch.randn(8, 3, 4), torch.randint(0, 4, (8, 4))  # L == C
    with torch.no_grad():
        expected = F.cross_entropy(net(x4), y4).item()
    with pytest.warns(SelftuneWarning, match=r"fit both .* pass classes_dim=1"):
        assert st.score(net, (x4, y4))["loss"] != pytest.approx(expected)  # one ambiguous batch alone
    with warnings.catch_warnings():
        warnings.simplefilter("error", SelftuneWarning)
        assert st.score(net, (x4, y4), classes_dim=1)["loss"] == pytest.approx(expected, rel=1e-5)

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop, self.conv = st.Dropout("d"), nn.Conv1d(3, 4, 1)

        def forward(self, x):
            return self.conv(self.drop(x))

    tagger = st.hypernetize(Tagger(), st.Space([st.Float("d", 0.0, 0.5, 0.1)]))
    tuner = st.SelfTuner(tagger, (x6, y6), (x6, y6), method="fixed", settings=st.TunerSettings(batch_size=4))
    assert tuner.objective.classes_dim == 1
    tagger.eval()
    with torch.no_grad():
        assert tuner.score((x4, y4))["loss"] == pytest.approx(F.cross_entropy(tagger(x4), y4).item(), rel=1e-5)
        assert tuner.objective.train_loss(tagger(x4), y4, lambda n: None).item() == pytest.approx(
            F.cross_entropy(tagger(x4), y4).item(), rel=1e-5)


def test_a_first_batch_that_fits_both_layouts_leaves_the_layout_to_the_first_that_tells():
    """Fixed from an ambiguous first batch (length 4 = the classes), the layout read every later (B, C, 6)
    batch the wrong way and the first step failed (found by a review): it stays open until a training batch
    whose shapes say where the classes are."""
    from torch import nn
    from torch.utils.data import DataLoader, Dataset

    import selftune as st

    class Seqs(Dataset):
        def __init__(self, n):
            g = torch.Generator().manual_seed(1)
            self.items = [(torch.randn(3, 4 if i < 2 else 6, generator=g),
                           torch.randint(0, 4, (4 if i < 2 else 6,), generator=g)) for i in range(n)]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    def pad(batch):
        length = max(x.shape[1] for x, _ in batch)
        return (torch.stack([nn.functional.pad(x, (0, length - x.shape[1])) for x, _ in batch]),
                torch.stack([nn.functional.pad(y, (0, length - y.shape[0]), value=-100) for _, y in batch]))

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop, self.conv = st.Dropout("d"), nn.Conv1d(3, 4, 1)

        def forward(self, x):
            return self.conv(self.drop(x))  # (B, 4 classes, L)

    torch.manual_seed(0)
    tagger = st.hypernetize(Tagger(), st.Space([st.Float("d", 0.0, 0.5, 0.1)]))
    with pytest.warns(SelftuneWarning, match="read with the classes in the last dimension"):
        tuner = st.SelfTuner(tagger, DataLoader(Seqs(32), collate_fn=pad), DataLoader(Seqs(16), collate_fn=pad),
                             method="fixed", settings=st.TunerSettings(batch_size=8))
    assert tuner.objective.classes_dim is None
    tuner.fit(1)
    assert tuner.objective.classes_dim == 1
