"""Property-based: malformed configs, arguments and files each get a one-line error naming the field,
exit status 2, no traceback, and nothing written (no output folder, no store, no checkpoints)."""

import contextlib
import copy
import io
import json
import keyword
import tempfile
import tomllib
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selftune.cli import main

BASE = tomllib.loads((Path(__file__).resolve().parents[1] / "examples" / "digits_mlp.toml").read_text())
TRIED: list[str] = []

identifiers = st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True).filter(lambda s: not keyword.iskeyword(s))
text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=5)  # any valid TOML string
not_a_number = st.one_of(text, st.booleans(), st.lists(st.integers(), max_size=2),
                         st.dictionaries(identifiers, st.integers(), max_size=1))
not_a_string = st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.lists(st.integers(), max_size=2))


def _set(cfg, path, value):
    node = cfg
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def _drop(cfg, path):
    node = cfg
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]


NUMERIC = [("epochs",), ("seed",), ("tuner", "lr"), ("tuner", "batch_size"), ("data", "val_fraction"),
           ("space", "dropout1", "low"), ("space", "dropout1", "init"), ("tuner", "warmup_epochs")]
OUT_OF_RANGE = [(("epochs",), st.integers(max_value=0)), (("tuner", "batch_size"), st.integers(max_value=0)),
                (("tuner", "lr"), st.floats(max_value=0.0, allow_nan=False)),
                (("data", "val_fraction"), st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0))),
                (("tuner", "momentum"), st.floats(min_value=1.0, allow_infinity=False)),
                (("tuner", "response_fraction"), st.floats(min_value=1.0001, allow_infinity=False)),
                (("data", "train_subset"), st.integers(max_value=-1)),
                (("data", "seq_len"), st.integers(max_value=1)),
                (("tuner", "grad_clip"), st.floats(max_value=0.0, allow_nan=False))]
REQUIRED = [("epochs",), ("data",), ("data", "name"), ("model",), ("model", "name"), ("space",),
            ("space", "dropout1", "low"), ("space", "dropout1", "high"), ("space", "dropout1", "init")]


@st.composite
def malformed(draw):
    """(description, config text or raw bytes, field expected in the message)."""
    cfg = copy.deepcopy(BASE)
    kind = draw(st.sampled_from(["type", "range", "missing", "unknown-key", "unknown-name", "bounds",
                                 "reference", "toml", "string-type"]))
    if kind == "type":
        path = draw(st.sampled_from(NUMERIC))
        _set(cfg, path, draw(not_a_number))
        field = ".".join(path)
    elif kind == "string-type":
        path = draw(st.sampled_from([("data", "name"), ("model", "name"), ("method",), ("device",)]))
        _set(cfg, path, draw(not_a_string))
        field = ".".join(path)
    elif kind == "range":
        path, values = draw(st.sampled_from(OUT_OF_RANGE))
        _set(cfg, path, draw(values))
        field = ".".join(path)
    elif kind == "missing":
        path = draw(st.sampled_from(REQUIRED))
        _drop(cfg, path)
        field = ".".join(path)
    elif kind == "unknown-key":
        section = draw(st.sampled_from([(), ("data",), ("tuner",), ("space", "dropout1")]))
        key = draw(identifiers.filter(lambda k: k not in _known(section)))
        node = cfg
        for s in section:
            node = node[s]
        node[key] = 1
        field = ".".join((*section, key))
    elif kind == "unknown-name":
        which = draw(st.sampled_from(["data", "model"]))
        cfg[which]["name"] = draw(identifiers.filter(lambda n: n not in {"digits", "mnist", "mlp", "simple_cnn"}))
        field = f"{which}.name"
    elif kind == "bounds":
        low = draw(st.floats(-10, 10))
        variant = draw(st.sampled_from(["inverted", "init-outside", "log-nonpositive"]))
        if variant == "inverted":
            cfg["space"]["dropout1"].update(low=low, high=low - draw(st.floats(0, 5)), init=low)
        elif variant == "init-outside":
            cfg["space"]["dropout1"].update(low=low, high=low + 1.0,
                                            init=low + draw(st.one_of(st.floats(1.001, 50), st.floats(-50, -0.001))))
        else:
            cfg["space"]["dropout1"].update(low=-abs(low), high=abs(low) + 1, init=0.0, log=True)
        field = "space.dropout1"
    elif kind == "reference":
        name = draw(identifiers.filter(lambda n: n not in cfg["space"]))
        where = draw(st.sampled_from(["model.dropout", "objective.weight_decay", "augment[0].std"]))
        if where == "model.dropout":
            cfg["model"]["dropout"][draw(st.integers(0, 2))] = name
        elif where == "objective.weight_decay":
            cfg["objective"] = {"weight_decay": name}
        else:
            cfg["augment"] = [{"op": "noise", "std": name}]
        field = where
    else:
        text = draw(st.sampled_from(["epochs = [", "[data\nname = 'x'", "= 3", "a = 1\na = 2", "x = \"unterminated"]))
        return kind, text, "CONFIG"
    return kind, _dump(cfg), field


def _known(section):
    node = BASE
    for s in section:
        node = node[s]
    known = set(node)
    if section == ():
        known |= {"objective", "augment", "tuner"}
    if section == ("data",):
        known |= {"test_subset", "split_seed", "train_subset", "val_subset"}
    if section == ("tuner",):
        from selftune.settings import TunerSettings

        known |= set(TunerSettings.model_fields)
    if section == ("space", "dropout1"):
        known |= {"type", "log"}
    return known


def _dump(cfg) -> str:
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")  # TOML escapes
        if isinstance(v, float):
            return repr(v) if v == v and abs(v) != float("inf") else ("nan" if v != v else ("inf" if v > 0 else "-inf"))
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        return str(v)

    lines = []
    tables = []
    for key, v in cfg.items():
        if isinstance(v, dict) and key == "space":
            for name, entry in v.items():
                tables.append(f"[space.{name}]\n" + "\n".join(f"{k} = {value(x)}" for k, x in entry.items())
                              if isinstance(entry, dict) else f"[space]\n{name} = {value(entry)}")
        elif isinstance(v, dict):
            tables.append(f"[{key}]\n" + "\n".join(f"{k} = {value(x)}" for k, x in v.items()))
        else:
            lines.append(f"{key} = {value(v)}")
    return "\n".join(lines) + "\n\n" + "\n\n".join(tables) + "\n"


def _run_cli(args, cwd):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), contextlib.chdir(cwd):
        code = main(args)
    return code, err.getvalue()


@settings(max_examples=260, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(malformed())
def test_malformed_configs_fail_cleanly(case):
    kind, text, field = case
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "bad.toml").write_text(text)
        code, err = _run_cli(["run", "bad.toml", "--out", "out", "--store", f"sqlite:///{tmp / 's.db'}"], tmp)
        assert code == 2, (kind, text, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("selftune: error: "), err
        assert "Traceback" not in err
        assert field.split(".")[0] in lines[0], (field, lines[0])
        assert sorted(p.name for p in tmp.iterdir()) == ["bad.toml"], "something was written"
    TRIED.append(kind)
    if len(TRIED) % 40 == 0:
        print(f"{kind}: {lines[0]}")


def test_unreadable_paths_and_enough_cases_were_tried(tmp_path):
    (tmp_path / "folder.toml").mkdir()
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00garbage")
    for path in ("missing.toml", "folder.toml", "binary.toml"):
        code, err = _run_cli(["run", path, "--store", f"sqlite:///{tmp_path / 's.db'}"], tmp_path)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "CONFIG" in err, err
    assert not (tmp_path / "s.db").exists()
    if TRIED:  # the property test ran in this session: it must have covered enough malformed configs
        assert len(TRIED) >= 200, len(TRIED)
        assert len(set(TRIED)) == 9, set(TRIED)
