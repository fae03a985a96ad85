"""Profile format: exact round trips, settings that build patterns, a complete validator (every
malformed input names its path), fuzzed inputs never escape as anything but ProfileError, model
fingerprints, profile/model matching, and MInference import. CPU only, seconds."""

from __future__ import annotations

import copy
import json
import math
import types
import warnings

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparseprefill.config import PatternName, SparseConfig, VerticalSlashConfig
from sparseprefill.kernels.mass_select import keep_by_cumulative_mass
from sparseprefill.patterns import (
    AntidiagonalPattern,
    AShapePattern,
    BlockSparsePattern,
    DensePattern,
    VerticalSlashPattern,
    build_pattern,
)
from sparseprefill.profiles import (
    ALLOWED_PATTERNS,
    MEASURED_KEYS,
    PATTERN_PARAMS,
    PROFILE_FORMAT,
    PROFILE_SCHEMA_PATH,
    PROFILE_VERSION,
    Calibration,
    HeadSetting,
    ModelIdentity,
    Profile,
    ProfileError,
    ProfileMismatchError,
    ProfileMismatchWarning,
    check_profile_matches,
    import_minference,
    load_profile,
    model_identity,
    save_profile,
)
from sparseprefill.profiles.schema import parse_profile_json

NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2


def llama_config(**overrides) -> transformers.LlamaConfig:
    kwargs = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS, num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS, vocab_size=100, architectures=["LlamaForCausalLM"],
    )
    kwargs.update(overrides)
    return transformers.LlamaConfig(**kwargs)


def valid_dict() -> dict:
    """A valid profile for ``llama_config()``: every pattern, optional params present and absent."""
    return {
        "format": PROFILE_FORMAT,
        "version": PROFILE_VERSION,
        "model": model_identity(llama_config()).to_dict(),
        "calibration": {
            "source": "synthetic", "lengths": [4096, 16384], "samples": 4,
            "objective": "attention_mass_recall", "target": 0.95, "tool_version": "0.1.0", "date": "2025-01-31",
        },
        "layers": [
            [
                {"pattern": "vertical_slash", "vertical_mass": 0.9, "slash_mass": 0.95, "max_vertical": 1000,
                 "max_slash": None, "sink_tokens": 64, "local_tokens": 128,
                 "measured": {"recall": {"4096": 0.97, "16384": 0.96}, "density": {"4096": 0.12}}},
                {"pattern": "block_sparse", "mass": 0.9, "top_k": 16},
                {"pattern": "antidiagonal", "mass": 0.95},
                {"pattern": "a_shape", "sink_tokens": 128, "local_tokens": 3968},
            ],
            [
                {"pattern": "vertical_slash", "vertical_mass": 0.0, "slash_mass": 1.0},
                {"pattern": "block_sparse", "mass": 1.0},
                {"pattern": "a_shape", "sink_tokens": 0, "local_tokens": 1, "measured": {}},
                {"pattern": "dense", "measured": {"recall": {"4096": 1.0}}},
            ],
        ],
    }


# ------------------------------------------------------------------------------------------------
# Round trips and use
# ------------------------------------------------------------------------------------------------


def test_round_trip_dict_is_exact():
    data = valid_dict()
    profile = load_profile(data)
    assert profile.to_dict() == data
    assert load_profile(profile.to_dict()) == profile
    assert json.loads(json.dumps(profile.to_dict(), allow_nan=False)) == data


def test_round_trip_file_is_exact(tmp_path):
    profile = load_profile(valid_dict())
    path = tmp_path / "p.json"
    save_profile(profile, path)
    text = path.read_text()
    assert text.endswith("}\n")
    assert load_profile(path) == profile
    assert load_profile(str(path)) == profile
    assert json.loads(text) == profile.to_dict()
    save_profile(load_profile(path), tmp_path / "q.json")
    assert (tmp_path / "q.json").read_text() == text  # byte-exact second generation
    # One head per line keeps diffs readable.
    head_lines = [line.strip().rstrip(",") for line in text.splitlines() if '"pattern"' in line]
    assert len(head_lines) == NUM_LAYERS * NUM_HEADS
    assert all(line.startswith("{") and line.endswith("}") for line in head_lines)


def test_to_config_builds_each_pattern():
    profile = load_profile(valid_dict())
    base = SparseConfig(vertical_slash=VerticalSlashConfig(local_tokens=256, max_slash=77))
    expected = [
        [VerticalSlashPattern, BlockSparsePattern, AntidiagonalPattern, AShapePattern],
        [VerticalSlashPattern, BlockSparsePattern, AShapePattern, DensePattern],
    ]
    for layer, classes in zip(profile.layers, expected):
        for head, cls in zip(layer, classes):
            cfg = head.to_config(base)
            assert cfg.pattern is head.pattern
            assert isinstance(build_pattern(cfg.pattern, cfg), cls)
    full = profile.layers[0][0].to_config(base).vertical_slash
    assert (full.vertical_mass, full.slash_mass, full.max_vertical, full.max_slash) == (0.9, 0.95, 1000, None)
    assert (full.sink_tokens, full.local_tokens) == (64, 128)
    # Parameters a profile leaves out keep the base config's values.
    minimal = profile.layers[1][0].to_config(base).vertical_slash
    assert (minimal.vertical_mass, minimal.slash_mass, minimal.local_tokens, minimal.max_slash) == (0.0, 1.0, 256, 77)
    assert minimal.last_queries == base.vertical_slash.last_queries
    block = profile.layers[0][1].to_config(base)
    assert (block.block_sparse.mass, block.block_sparse.top_k) == (0.9, 16)
    assert profile.layers[0][2].to_config(base).antidiagonal.mass == 0.95
    shape = profile.layers[0][3].to_config(base).a_shape
    assert (shape.sink_tokens, shape.local_tokens) == (128, 3968)
    # Other sections are untouched.
    assert block.vertical_slash == base.vertical_slash and block.min_sparse_len == base.min_sparse_len


def test_key_groups_identical_settings():
    a = HeadSetting(PatternName.VERTICAL_SLASH, {"slash_mass": 0.9, "vertical_mass": 0.8})
    b = HeadSetting("vertical_slash", {"vertical_mass": 0.8, "slash_mass": 0.9}, {"recall": {"4096": 0.9}})
    c = HeadSetting(PatternName.VERTICAL_SLASH, {"vertical_mass": 0.8, "slash_mass": 0.91})
    assert a.key() == b.key() != c.key()
    assert hash(a) == hash(b)
    assert len({a.key(), b.key(), c.key()}) == 2
    assert a.pattern is PatternName.VERTICAL_SLASH and b.pattern is PatternName.VERTICAL_SLASH
    with pytest.raises(TypeError):
        a.params["vertical_mass"] = 0.1  # read-only: a frozen setting stays frozen


def test_pattern_mix():
    assert load_profile(valid_dict()).pattern_mix() == {
        "vertical_slash": 2, "block_sparse": 2, "antidiagonal": 1, "a_shape": 2, "dense": 1,
    }


def test_direct_construction_is_validated():
    with pytest.raises(ProfileError, match=r"^head\.pattern: 'auto' is not allowed"):
        HeadSetting(PatternName.AUTO, {})
    with pytest.raises(ProfileError, match=r"^head\.mass: unknown parameter"):
        HeadSetting(PatternName.A_SHAPE, {"sink_tokens": 1, "local_tokens": 2, "mass": 0.5})
    identity = model_identity(llama_config())
    calibration = Calibration("x", (4096,), 1, "attention_mass_recall", 0.9, "0.1.0", "2025-01-01")
    with pytest.raises(ProfileError, match=r"^layers: has 1 layers, the model section says 2"):
        Profile(identity, calibration, ((HeadSetting(PatternName.DENSE),) * NUM_HEADS,))
    with pytest.raises(ProfileError, match=r"^calibration\.lengths\[0\]"):
        Calibration("x", (True,), 1, "o", 0.9, "0.1.0", "2025-01-01")


# ------------------------------------------------------------------------------------------------
# Malformed profiles: each names its path
# ------------------------------------------------------------------------------------------------


def _set(*path_and_value):
    *path, value = path_and_value

    def mutate(d):
        target = d
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


def _delete(*path):
    def mutate(d):
        target = d
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    return mutate


VS = ("layers", 0, 0)  # vertical_slash head with every parameter
BS = ("layers", 0, 1)
AD = ("layers", 0, 2)
AS = ("layers", 0, 3)

MALFORMED = [
    ("wrong format", _set("format", "other-profile"), "format: must be"),
    ("missing format", _delete("format"), "format: missing"),
    ("wrong version", _set("version", 2), "version: found version 2, this sparseprefill supports version 1"),
    ("version as string", _set("version", "1"), "version: must be an integer"),
    ("version as bool", _set("version", True), "version: must be an integer"),
    ("missing model", _delete("model"), "model: missing"),
    ("missing calibration", _delete("calibration"), "calibration: missing"),
    ("missing layers", _delete("layers"), "layers: missing"),
    ("unknown top-level key", _set("notes", "x"), "<profile>: unknown key 'notes'"),
    ("model not object", _set("model", [1]), "model: must be an object"),
    ("bool as int", _set("model", "num_layers", True), "model.num_layers: must be an integer >= 1, got boolean"),
    ("zero heads", _set("model", "num_query_heads", 0), "model.num_query_heads: must be an integer >= 1, got 0"),
    ("negative head_dim", _set("model", "head_dim", -1), "model.head_dim:"),
    ("float count", _set("model", "head_dim", 16.0), "model.head_dim: must be an integer"),
    ("kv heads not dividing", _set("model", "num_kv_heads", 3), "model.num_kv_heads: must divide"),
    ("bad fingerprint", _set("model", "fingerprint", "abc"), "model.fingerprint:"),
    ("empty model_type", _set("model", "model_type", " "), "model.model_type: must be a non-empty string"),
    ("missing model field", _delete("model", "head_dim"), "model.head_dim: missing"),
    ("unknown model key", _set("model", "dtype", "bf16"), "model: unknown key 'dtype'"),
    ("empty lengths", _set("calibration", "lengths", []), "calibration.lengths: must be a non-empty array"),
    ("lengths not array", _set("calibration", "lengths", "4096"), "calibration.lengths: must be an array"),
    ("zero length", _set("calibration", "lengths", [4096, 0]), "calibration.lengths[1]:"),
    ("duplicate length", _set("calibration", "lengths", [4096, 4096]), "calibration.lengths[1]: duplicate"),
    ("negative samples", _set("calibration", "samples", -1), "calibration.samples:"),
    ("target zero", _set("calibration", "target", 0), "calibration.target: must be in (0, 1]"),
    ("target above one", _set("calibration", "target", 1.5), "calibration.target: must be in (0, 1], got 1.5"),
    ("target NaN", _set("calibration", "target", math.nan), "calibration.target: must be a finite number"),
    ("impossible date", _set("calibration", "date", "2025-13-01"), "calibration.date: must be an ISO date"),
    ("not a date", _set("calibration", "date", "yesterday"), "calibration.date:"),
    ("empty source", _set("calibration", "source", ""), "calibration.source: must be a non-empty string"),
    ("missing calibration field", _delete("calibration", "objective"), "calibration.objective: missing"),
    ("unknown calibration key", _set("calibration", "seed", 1), "calibration: unknown key 'seed'"),
    ("wrong layer count", lambda d: d["layers"].pop(), "layers: has 1 layers, the model section says 2"),
    ("wrong head count", lambda d: d["layers"][1].pop(), "layers[1]: has 3 heads, the model section says 4"),
    ("layers not array", _set("layers", {}), "layers: must be an array"),
    ("layer not array", _set("layers", 0, "dense"), "layers[0]: must be an array"),
    ("head not object", _set("layers", 0, 2, "dense"), "layers[0][2]: must be an object"),
    ("head without pattern", _delete(*VS, "pattern"), "layers[0][0].pattern: missing"),
    ("unknown pattern", _set(*VS, "pattern", "sparse"),
     "layers[0][0].pattern: unknown pattern 'sparse'; allowed: 'vertical_slash', 'block_sparse', 'antidiagonal', 'a_shape', 'dense'"),
    ("auto pattern", _set(*VS, "pattern", "auto"), "layers[0][0].pattern: 'auto' is not allowed"),
    ("pattern not string", _set(*VS, "pattern", 3), "layers[0][0].pattern: must be a pattern name string"),
    ("unknown param", _set(*VS, "mass", 0.9), "layers[0][0].mass: unknown parameter for pattern 'vertical_slash'"),
    ("param on dense", _set("layers", 1, 3, "sink_tokens", 4), "layers[1][3].sink_tokens: unknown parameter"),
    ("vertical_mass 1.5", _set(*VS, "vertical_mass", 1.5), "layers[0][0].vertical_mass: must be in [0, 1], got 1.5"),
    ("vertical_mass -0.1", _set(*VS, "vertical_mass", -0.1), "layers[0][0].vertical_mass: must be in [0, 1]"),
    ("vertical_mass bool", _set(*VS, "vertical_mass", True), "layers[0][0].vertical_mass: must be a number"),
    ("slash_mass inf", _set(*VS, "slash_mass", math.inf), "layers[0][0].slash_mass: must be a finite number"),
    ("slash_mass string", _set(*VS, "slash_mass", "0.9"), "layers[0][0].slash_mass: must be a number"),
    ("missing required param", _delete(*VS, "vertical_mass"), "layers[0][0].vertical_mass: missing"),
    ("max_vertical 0", _set(*VS, "max_vertical", 0), "layers[0][0].max_vertical: must be an integer >= 1, got 0"),
    ("max_slash float", _set(*VS, "max_slash", 2.0), "layers[0][0].max_slash: must be an integer"),
    ("local_tokens 0", _set(*VS, "local_tokens", 0), "layers[0][0].local_tokens:"),
    ("block mass 0", _set(*BS, "mass", 0), "layers[0][1].mass: must be in (0, 1], got 0.0"),
    ("block mass 1.5", _set(*BS, "mass", 1.5), "layers[0][1].mass: must be in (0, 1]"),
    ("top_k 0", _set(*BS, "top_k", 0), "layers[0][1].top_k: must be an integer >= 1"),
    ("antidiagonal mass -0.1", _set(*AD, "mass", -0.1), "layers[0][2].mass: must be in (0, 1]"),
    ("a_shape local 0", _set(*AS, "local_tokens", 0), "layers[0][3].local_tokens: must be an integer >= 1"),
    ("a_shape sink -1", _set(*AS, "sink_tokens", -1), "layers[0][3].sink_tokens: must be an integer >= 0"),
    ("a_shape missing local", _delete(*AS, "local_tokens"), "layers[0][3].local_tokens: missing"),
    ("measured bad key", _set(*VS, "measured", "speed", {}), "layers[0][0].measured: unknown key 'speed'"),
    ("measured not object", _set(*VS, "measured", [0.9]), "layers[0][0].measured: must be an object"),
    ("measured density array", _set(*VS, "measured", "density", [0.1]), "layers[0][0].measured.density: must be an object"),
    ("measured length key", _set(*VS, "measured", "recall", "4k", 0.9), 'layers[0][0].measured.recall["4k"]: keys must be'),
    ("measured leading zero", _set(*VS, "measured", "recall", "04096", 0.9), 'layers[0][0].measured.recall["04096"]:'),
    ("measured above one", _set(*VS, "measured", "recall", "4096", 1.2), 'layers[0][0].measured.recall["4096"]: must be in [0, 1]'),
    ("non-string key", _set(*VS, 7, 1), "layers[0][0]: object keys must be strings"),
]


@pytest.mark.parametrize("mutate,prefix", [pytest.param(m, p, id=name) for name, m, p in MALFORMED])
def test_malformed_profile_names_the_path(mutate, prefix):
    data = valid_dict()
    mutate(data)
    with pytest.raises(ProfileError) as info:
        load_profile(data)
    assert str(info.value).startswith(prefix), str(info.value)
    assert isinstance(info.value, ValueError)


def test_profile_not_an_object(tmp_path):
    path = tmp_path / "array.json"
    path.write_text("[]")
    with pytest.raises(ProfileError, match=r"^<profile>: must be an object, got array"):
        load_profile(path)


def test_load_profile_rejects_other_types():
    with pytest.raises(TypeError):
        load_profile(42)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_json_literals_rejected(tmp_path, literal):
    text = json.dumps(valid_dict(), indent=2).replace('"target": 0.95', f'"target": {literal}')
    assert literal in text
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert str(info.value).startswith(f"{path}: invalid JSON")
    assert literal.lstrip("-") in str(info.value)


def test_json_decode_error_names_file_and_position(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "format": "sparseprefill-profile",\n  "version": 1,,\n}')
    with pytest.raises(ProfileError, match=r"invalid JSON at line 3 column 16") as info:
        load_profile(path)
    assert str(info.value).startswith(str(path))


def test_duplicate_json_keys_rejected(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text('{"format": "sparseprefill-profile", "format": "x"}')
    with pytest.raises(ProfileError, match="duplicate key 'format'"):
        load_profile(path)


def test_file_errors_keep_the_path_and_name_the_file(tmp_path):
    data = valid_dict()
    data["layers"][0][0]["vertical_mass"] = 1.5
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    message = str(info.value)
    assert message.startswith("layers[0][0].vertical_mass: must be in [0, 1], got 1.5")
    assert message.endswith(f"(in {path})")
    assert info.value.path == "layers[0][0].vertical_mass"


# ------------------------------------------------------------------------------------------------
# Fuzz: mutated profiles load to a re-loadable Profile or raise ProfileError, nothing else
# ------------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
boundary_values = st.sampled_from(
    [0, 1, -1, 0.0, 1.0, 1.5, -0.1, 2**63, 1e308, True, False, None, "", "1", [], {}, math.nan, math.inf,
     "auto", "dense", "vertical_slash", "4096"]
)


def _positions(obj, out):
    """Every (container, key) in the tree, containers first."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in list(items):
        out.append((obj, key))
        _positions(value, out)
    return out


def _containers(obj, out):
    if isinstance(obj, (dict, list)):
        out.append(obj)
        for value in obj.values() if isinstance(obj, dict) else obj:
            _containers(value, out)
    return out


@settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutations_raise_only_profile_error(data):
    doc = valid_dict()
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        op = data.draw(st.sampled_from(["delete", "replace", "boundary", "insert", "append"]), label="op")
        if op in ("delete", "replace", "boundary"):
            positions = _positions(doc, [])
            container, key = positions[data.draw(st.integers(0, len(positions) - 1), label="position")]
            if op == "delete":
                container.pop(key)
            else:
                # A copy: sampled_from hands out the same [] / {} objects, which later mutations would change.
                container[key] = copy.deepcopy(data.draw(json_values if op == "replace" else boundary_values,
                                                         label="value"))
        else:
            containers = _containers(doc, [])
            container = containers[data.draw(st.integers(0, len(containers) - 1), label="container")]
            value = copy.deepcopy(data.draw(json_values | boundary_values, label="value"))
            if isinstance(container, dict):
                container[data.draw(st.text(max_size=12), label="key")] = value
            elif op == "append" and container:
                container.append(copy.deepcopy(container[data.draw(st.integers(0, len(container) - 1))]))
            else:
                container.append(value)
    sources = [doc]
    try:
        sources.append(parse_profile_json(json.dumps(doc), "<fuzz>"))  # NaN/Infinity literals included
    except ProfileError:
        pass
    for source in sources:
        try:
            profile = load_profile(source)
        except ProfileError:
            continue
        again = load_profile(profile.to_dict())
        assert again == profile
        assert again.to_dict() == profile.to_dict()
        assert load_profile(json.loads(json.dumps(profile.to_dict(), allow_nan=False))) == profile


# ------------------------------------------------------------------------------------------------
# Model identity and matching
# ------------------------------------------------------------------------------------------------


def test_fingerprint_stable_and_sensitive():
    base = model_identity(llama_config())
    assert base == model_identity(llama_config())
    assert base.fingerprint.startswith("sha256:") and len(base.fingerprint) == len("sha256:") + 64
    assert (base.architecture, base.model_type) == ("LlamaForCausalLM", "llama")
    assert (base.num_layers, base.num_query_heads, base.num_kv_heads, base.head_dim) == (2, 4, 2, 16)
    for change in [
        dict(num_key_value_heads=4), dict(num_key_value_heads=1), dict(vocab_size=101),
        dict(max_position_embeddings=4096), dict(num_hidden_layers=3),
        dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    ]:
        assert model_identity(llama_config(**change)).fingerprint != base.fingerprint, change
    # The architecture name is not part of the fingerprint (a config built in code names none).
    assert model_identity(llama_config(architectures=None)).fingerprint == base.fingerprint
    assert model_identity(llama_config(architectures=None)).architecture == ""


def test_fingerprint_duck_typed_and_rope_spellings():
    v5 = types.SimpleNamespace(
        model_type="llama", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
        head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, max_position_embeddings=2048,
        vocab_size=100, architectures=["LlamaForCausalLM"],
    )
    assert model_identity(v5) == model_identity(llama_config())
    # transformers 4 spelling of the same model: rope_theta attribute (an int here), no rope dict, head_dim
    # implied by hidden_size.
    v4 = types.SimpleNamespace(**{k: v for k, v in vars(v5).items() if k != "rope_parameters"},
                               rope_theta=10000, rope_scaling=None)
    v4.head_dim = None
    assert model_identity(v4).fingerprint == model_identity(v5).fingerprint
    no_kv = types.SimpleNamespace(**{k: v for k, v in vars(v5).items() if k != "num_key_value_heads"})
    assert model_identity(no_kv).num_kv_heads == 4
    qwen = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    assert getattr(qwen, "head_dim", None) is None and model_identity(qwen).head_dim == 16
    with pytest.raises(ValueError, match="num_hidden_layers"):
        model_identity(types.SimpleNamespace(model_type="x", num_attention_heads=4))


def _profile_for(config) -> Profile:
    data = valid_dict()
    data["model"] = model_identity(config).to_dict()
    return load_profile(data)


def test_check_profile_matches():
    profile = _profile_for(llama_config())
    assert check_profile_matches(profile, llama_config()) == ()
    assert check_profile_matches(profile, llama_config(architectures=None)) == ()  # unknown architecture
    other = llama_config(num_key_value_heads=4, vocab_size=101)
    with pytest.raises(ProfileMismatchError) as info:
        check_profile_matches(profile, other)
    message = str(info.value)
    assert "num_kv_heads: model has 4, profile says 2" in message and "fingerprint:" in message
    with pytest.warns(ProfileMismatchWarning, match="num_kv_heads: model has 4, profile says 2"):
        assert check_profile_matches(profile, other, allow_mismatch=True) == ("num_kv_heads", "fingerprint")
    renamed = llama_config(architectures=["MistralForCausalLM"])
    with pytest.raises(ProfileMismatchError, match="architecture: model has 'MistralForCausalLM'"):
        check_profile_matches(profile, renamed)


@pytest.mark.parametrize("change,field", [
    (dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16), "num_query_heads"),
    (dict(num_hidden_layers=3), "num_layers"),
])
def test_layout_mismatch_always_raises(change, field):
    profile = _profile_for(llama_config())
    for allow in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning first: layout problems are errors only
            with pytest.raises(ProfileMismatchError, match=f"{field}: model has") as info:
                check_profile_matches(profile, llama_config(**change), allow_mismatch=allow)
        assert "allow_mismatch does not cover this" in str(info.value)


# ------------------------------------------------------------------------------------------------
# MInference import
# ------------------------------------------------------------------------------------------------

MINFERENCE_FILE = [
    {
        "0": ["vertical_and_slash", 1000, 6096, 0.91],
        "1": ["stream_llm", 100, 800, 0.5],
        "2": ["block_sparse", 8, 1, 0.7],
        "3": ["vertical_and_slash", 30, 800, 0.99],
    },
    {
        "3": ["vertical_and_slash", 10, 60, 0.4],  # keys in any order; sizes below the clamps
        "0": ["vertical_and_slash", 3500, 100, 0.6],
        "1": ["stream_llm", 4, 64, 1],
        "2": ["block_sparse", 10, 1, 0.8],
    },
]


def test_import_minference_settings(tmp_path):
    path = tmp_path / "Llama_tiny_best_pattern.json"
    path.write_text(json.dumps(MINFERENCE_FILE))
    profile = import_minference(path, llama_config())
    vs = PatternName.VERTICAL_SLASH
    expected = [
        [
            HeadSetting(vs, dict(vertical_mass=1.0, slash_mass=1.0, max_vertical=970, max_slash=5996,
                                 sink_tokens=30, local_tokens=100)),
            HeadSetting(PatternName.A_SHAPE, dict(sink_tokens=100, local_tokens=800)),
            HeadSetting(PatternName.BLOCK_SPARSE, dict(mass=1.0, top_k=50)),  # 100 x 64 keys at block size 128
            HeadSetting(vs, dict(vertical_mass=0.0, slash_mass=1.0, max_vertical=None, max_slash=700,
                                 sink_tokens=30, local_tokens=100)),
        ],
        [
            HeadSetting(vs, dict(vertical_mass=1.0, slash_mass=0.0, max_vertical=3470, max_slash=None,
                                 sink_tokens=30, local_tokens=100)),
            HeadSetting(PatternName.A_SHAPE, dict(sink_tokens=4, local_tokens=64)),
            HeadSetting(PatternName.BLOCK_SPARSE, dict(mass=1.0, top_k=50)),
            # 10 verticals are clamped up to 30, all of them sinks; 60 slashes are all nearest diagonals.
            HeadSetting(vs, dict(vertical_mass=0.0, slash_mass=0.0, max_vertical=None, max_slash=None,
                                 sink_tokens=30, local_tokens=60)),
        ],
    ]
    assert [list(layer) for layer in profile.layers] == expected
    assert profile.model == model_identity(llama_config())
    cal = profile.calibration
    assert (cal.source, cal.lengths, cal.samples, cal.objective, cal.target) == (
        "minference:Llama_tiny_best_pattern.json", (131072,), 0, "minference_import", 1.0)
    save_profile(profile, tmp_path / "imported.json")
    assert load_profile(tmp_path / "imported.json") == profile
    for layer in profile.layers:
        for head in layer:
            cfg = head.to_config(SparseConfig())
            build_pattern(cfg.pattern, cfg)
    at_64 = import_minference(MINFERENCE_FILE, llama_config(), block_size_q=64, calibration_length=262144)
    assert at_64.layers[0][2].params["top_k"] == 100
    assert at_64.calibration.source == "minference:in-memory" and at_64.calibration.lengths == (262144,)


def test_mass_zero_keeps_only_forced_lines():
    """The import relies on it: vertical/slash mass 0.0 keeps exactly the sink/local lines."""
    scores = torch.rand(2, 3, 50)
    valid = torch.ones_like(scores, dtype=torch.bool)
    forced = (torch.arange(50) < 7).expand_as(valid)
    assert torch.equal(keep_by_cumulative_mass(scores, valid, forced, 0.0), forced)
    capped = keep_by_cumulative_mass(scores, valid, forced, 1.0, max_count=5)
    assert torch.equal(capped.sum(-1), torch.full((2, 3), 12))


def _mutated_minference(mutate):
    data = copy.deepcopy(MINFERENCE_FILE)
    mutate(data)
    return data


MALFORMED_MINFERENCE = [
    ("not a list", lambda d: d.clear() or None, "minference: 0 layers, the model has 2"),
    ("extra layer", lambda d: d.append(copy.deepcopy(d[0])), "minference: 3 layers, the model has 2"),
    ("missing head", lambda d: d[1].pop("2"), "minference[1]: 3 heads, the model has 4"),
    ("extra head", _set(0, "4", ["stream_llm", 1, 1, 0.0]), "minference[0]: 5 heads, the model has 4"),
    ("layer not object", _set(1, [1, 2]), "minference[1]: must be an object"),
    ("head index out of range", lambda d: d[0].update({"4": d[0].pop("3")}),
     'minference[0]["4"]: head index out of range 0..3'),
    ("head index not canonical", lambda d: d[0].update({"03": d[0].pop("3")}), 'minference[0]["03"]: head index must be'),
    ("unknown pattern", _set(0, "1", 0, "a_shape"), 'minference[0]["1"][0]: unknown MInference pattern'),
    ("size zero", _set(0, "0", 1, 0), 'minference[0]["0"][1]: must be an integer >= 1, got 0'),
    ("size bool", _set(0, "0", 2, True), 'minference[0]["0"][2]: must be an integer >= 1, got boolean'),
    ("size float", _set(1, "1", 2, 64.0), 'minference[1]["1"][2]: must be an integer'),
    ("score string", _set(0, "2", 3, "high"), 'minference[0]["2"][3]: must be a number'),
    ("short entry", _set(0, "2", ["block_sparse", 8, 1]), 'minference[0]["2"]: must be [pattern_name, vertical_size'),
    ("entry not array", _set(0, "2", "block_sparse"), 'minference[0]["2"]: must be an array'),
]


@pytest.mark.parametrize("mutate,prefix", [pytest.param(m, p, id=n) for n, m, p in MALFORMED_MINFERENCE])
def test_import_minference_malformed(mutate, prefix):
    with pytest.raises(ProfileError) as info:
        import_minference(_mutated_minference(mutate), llama_config())
    assert str(info.value).startswith(prefix), str(info.value)


def test_import_minference_bad_files(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps(MINFERENCE_FILE).replace("0.91", "NaN"))
    with pytest.raises(ProfileError, match="NaN") as info:
        import_minference(path, llama_config())
    assert str(info.value).startswith(str(path))
    path.write_text(json.dumps({"0": {}}))
    with pytest.raises(ProfileError, match=r"^minference: must be an array.*\(in .*m\.json\)$"):
        import_minference(path, llama_config())


# ------------------------------------------------------------------------------------------------
# JSON Schema file stays in step with the validator
# ------------------------------------------------------------------------------------------------


def _schema() -> dict:
    return json.loads(PROFILE_SCHEMA_PATH.read_text())


def test_schema_file_matches_validator():
    schema = _schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert "load_profile" in schema["description"] and "authoritative" in schema["description"]
    assert schema["$defs"]["pattern_name"]["enum"] == [p.value for p in ALLOWED_PATTERNS]
    assert schema["properties"]["format"]["const"] == PROFILE_FORMAT
    assert schema["properties"]["version"]["const"] == PROFILE_VERSION
    assert set(schema["required"]) == set(valid_dict())
    model = schema["properties"]["model"]
    assert set(model["required"]) == set(valid_dict()["model"]) - {"fingerprinted"}
    assert set(model["properties"]) == set(valid_dict()["model"])
    assert set(schema["properties"]["calibration"]["required"]) == set(valid_dict()["calibration"])
    assert list(schema["$defs"]["measured"]["properties"]) == list(MEASURED_KEYS)
    for pattern, specs in PATTERN_PARAMS.items():
        head = schema["$defs"][f"head_{pattern.value}"]
        assert head["properties"]["pattern"]["const"] == pattern.value
        assert set(head["properties"]) == {"pattern", "measured", *specs}
        assert set(head["required"]) == {"pattern", *(name for name, spec in specs.items() if spec.required)}
        for name, spec in specs.items():
            assert head["properties"][name]["$ref"] == f"#/$defs/{spec.kind.value}", (pattern, name)
    assert len(schema["$defs"]["head"]["oneOf"]) == len(PATTERN_PARAMS)


def test_schema_validates_round_tripped_profile():
    jsonschema = pytest.importorskip("jsonschema")
    schema = _schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    validator.validate(load_profile(valid_dict()).to_dict())
    validator.validate(import_minference(MINFERENCE_FILE, llama_config()).to_dict())
    bad = valid_dict()
    bad["layers"][0][0]["pattern"] = "auto"
    assert not validator.is_valid(bad)


def test_model_identity_round_trip_type():
    identity = ModelIdentity(**valid_dict()["model"])
    assert identity.to_dict() == valid_dict()["model"]


def test_a_missing_or_directory_profile_path_is_a_profile_error(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ProfileError, match="nope.json: no such file; expected a profile JSON file"):
        load_profile(missing)
    with pytest.raises(ProfileError, match="is a directory; expected a profile JSON file"):
        load_profile(tmp_path)


def test_a_fingerprint_mismatch_names_each_differing_config_field():
    profile = load_profile(valid_dict())
    other = llama_config(max_position_embeddings=77, vocab_size=101)
    with pytest.raises(ProfileMismatchError) as error:
        check_profile_matches(profile, other)
    message = str(error.value)
    assert "fingerprint: model has 'sha256:" in message
    assert "config.max_position_embeddings: model has 77, profile says 2048" in message
    assert "config.vocab_size: model has 101, profile says 100" in message
    assert "config.num_hidden_layers" not in message  # only the fields that differ
    with pytest.warns(ProfileMismatchWarning, match="config.max_position_embeddings: model has 77"):
        check_profile_matches(profile, other, allow_mismatch=True)


def test_a_profile_without_fingerprinted_fields_still_loads_and_says_so():
    data = valid_dict()
    del data["model"]["fingerprinted"]
    profile = load_profile(data)
    other = llama_config(max_position_embeddings=77)
    with pytest.raises(ProfileMismatchError, match="does not record the fingerprinted config fields"):
        check_profile_matches(profile, other)


def test_fingerprinted_fields_must_hash_to_the_fingerprint():
    data = valid_dict()
    data["model"]["fingerprinted"]["vocab_size"] = 1
    with pytest.raises(ProfileError, match=r"model.fingerprinted: does not hash to model.fingerprint"):
        load_profile(data)
