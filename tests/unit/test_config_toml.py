"""A run's config.toml loads back as the same config, whatever characters its strings hold.

Every run writes ``cfg.to_toml()`` to its folder and into each checkpoint; ``--config
runs/X/config.toml`` and ``--resume`` read it back. The strings (run_dir, output, data.path, the
array names, model.factory) come from users and file systems: quotes, backslashes, newlines,
control characters, any unicode, text that looks like TOML itself.
"""

import random
import sys
import tomllib

import pytest

from easgd_mpi.config import Config
from easgd_mpi.config_io import flatten

CONTROL = [chr(c) for c in range(0x20)] + ["\x7f"]

STRINGS = [
    "",
    "plain",
    "with space",
    '"',
    "'",
    '"quoted"',
    "'single'",
    '"""',
    "'''",
    "\\",
    "trailing\\",
    "\\\\server\\share",
    "\\n is not a newline",
    "\\u0041 is not an A",
    "a\nb",
    "a\r\nb",
    "\r",
    "tab\there",
    "".join(CONTROL),
    *CONTROL,
    "é ñ ß Ω",
    "中文 日本語 한국어",
    "עברית العربية",  # right to left
    "😀 𝄞 𐍈",  # astral plane (surrogate pairs in UTF-16, 4 bytes in UTF-8)
    "\U0010ffff",
    "e\u0301",  # combining accent
    "\ufeff",  # byte order mark
    "\u2028\u2029\x85",  # line and paragraph separators, NEL
    "\u00a0\u200b",  # no-break space, zero-width space
    'a = "b"',
    "[table]",
    "[[array]]",
    "# comment",
    'x = 1\n[data]\nname = "synthetic"',  # would set other keys if written unescaped
    '"""\nmultiline\n"""',
    "key = '''raw'''",
    "{ inline = 1 }",
    "1979-05-27T07:32:00Z",
    "inf",
    "true",
    "0x1f",
]


def _random_strings(count: int, seed: int = 17) -> list[str]:
    """Strings of random code points from the whole range (lone surrogates excluded: UTF-8,
    and so TOML, cannot hold them), weighted towards the control and ASCII ones."""
    rng = random.Random(seed)
    pools = [(0, 0x7F), (0x80, 0xFFFF), (0x10000, sys.maxunicode)]
    found = []
    while len(found) < count:
        chars = []
        for _ in range(rng.randint(1, 24)):
            low, high = pools[rng.choice((0, 0, 0, 1, 2))]
            c = rng.randint(low, high)
            if not 0xD800 <= c <= 0xDFFF:
                chars.append(chr(c))
        found.append("".join(chars))
    return found


@pytest.mark.parametrize("text", STRINGS + _random_strings(200), ids=ascii)
def test_config_toml_loads_back_the_same_config(text, tmp_path):
    cfg = Config.from_dict(
        {
            "run_dir": text,
            "output": text or "runs",
            "data": {"path": text, "x_key": text, "y_key": text},
            "model": {"name": "torch", "factory": text or "module:function"},
        }
    ).validate()
    path = tmp_path / "config.toml"
    path.write_text(cfg.to_toml(), encoding="utf-8")  # as the run folder gets it

    again = Config.from_toml(path, environ={})
    assert again == cfg
    assert again.run_dir == text
    # A resumed run reads it from the checkpoint as text.
    assert Config.from_toml(None, environ={}, base_toml=cfg.to_toml()) == cfg


@pytest.mark.parametrize("text", ["a\nb", 'say "x"\t\x00\x7f', "😀\\", 'x = 1\n[data]\nname = "y"'])
def test_changes_from_lists_an_odd_string_on_one_line(text):
    base = Config.from_dict({"run_dir": text}).validate()
    cfg = Config.from_toml(None, environ={}, base_toml=base.to_toml(), overrides={"steps": 7})
    assert cfg.run_dir == text and cfg.changes_from(base.to_toml()) == ["steps 20000 → 7 (--set)"]

    moved = Config.from_toml(None, environ={}, overrides={"run_dir": "plain"})
    (line,) = moved.changes_from(base.to_toml())
    assert line.startswith("run_dir ") and line.endswith(' → "plain" (--set)')
    assert "\n" not in line and "\x00" not in line
    # The old value is shown as TOML writes it, so it reads back as the same string.
    shown = line.removeprefix("run_dir ").removesuffix(' → "plain" (--set)')
    assert tomllib.loads(f"v = {shown}")["v"] == text


def test_lists_and_unset_keys_in_changes_from():
    base = Config.from_dict({"model": {"hidden": [32, 16]}, "alpha": 0.1}).to_toml()
    cfg = Config.from_toml(None, environ={}, overrides={"model.hidden": "[8]"})
    assert cfg.changes_from(base) == [
        "alpha 0.1 → unset (this launch)",
        "model.hidden [32, 16] → [8] (--set)",
    ]


def test_to_toml_keeps_the_fields_order_and_drops_unset_keys():
    cfg = Config.from_dict({"rho": 2.0, "model": {"hidden": [32, 16]}})
    text = cfg.to_toml()
    assert list(flatten(tomllib.loads(text))) == list(flatten(cfg.to_dict()))
    assert "rho = 2.0\n" in text and "alpha" not in text and "beta" not in text
    assert text.index("[data]") < text.index("[model]") < text.index("[quadratic]")
    assert text.index("[quadratic]") < text.index("[checkpoint]")
    assert cfg.to_toml() == Config.from_toml(None, environ={}, base_toml=text).to_toml()
