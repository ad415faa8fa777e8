"""The README and docs/ stay true to the repository and to the CLI.

Docs rot quietly: a results file moves, a heading is renamed, an option is renamed in code
and not in the text. These tests read the markdown as a user would follow it: every relative
link opens a file (and its ``#anchor`` a heading there), every ``stn-deploy COMMAND`` shown
exists, every option shown on a documented command line is one that command takes, the README
stays short, and no work-in-progress history leaks into user-facing text.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from stn_deploy.cli import COMMANDS, cli

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
# Every markdown file whose links are checked.
LINKED = [README, *DOCS, ROOT / "runtimes" / "cpp" / "README.md", ROOT / "export" / "README.md"]
# Files whose commands, options and wording are held to the rules below. docs/vocabulary.md
# names commands other work adds (debug, profile) without promising them to exist.
USER_TEXT = [README, *(d for d in DOCS if d.name != "vocabulary.md")]
README_MAX_LINES = 260
# Phrases of a lab notebook, not of user docs: internal references, run logs, jargon.
NOTEBOOK_PHRASES = ("issue #", " utc", "this session", "session log", "take-off", "taken off",
                    "the charge", "seed design", "development machine", "lab notebook",
                    "beside a single")

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]+`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)
COMMAND = re.compile(r"(?<![\w/.-])stn-deploy[ \t]+([a-z][a-z0-9-]*)")


def _prose(text: str) -> str:
    """The text with fenced code blocks and inline code removed: links and headings live
    only outside them."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _code(text: str) -> list[str]:
    """Fenced code blocks and inline code spans, where commands are shown."""
    return [m.group(0) for m in FENCE.finditer(text)] + INLINE_CODE.findall(FENCE.sub("", text))


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        slug = github_slug(heading)
        result.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return result


def relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(_prose(path.read_text(encoding="utf-8")))
            if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto: ...


def test_the_link_checker_finds_links_and_anchors(tmp_path: Path) -> None:
    """The checks below are only as good as their parsing: a known page, known results."""
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n## C++ and Python\n\n## FP16 and INT8: the STN path\n\n"
                    "```bash\n# not a heading [nor](a-link.md)\n```\n"
                    "See [a](other.md#x), ![pic](img/p.png) and [b](https://example.com);"
                    " `[code](ignored.md)`.\n", encoding="utf-8")
    assert relative_links(page) == ["other.md#x", "img/p.png"]
    assert anchors(page) == {"top", "c-and-python", "fp16-and-int8-the-stn-path"}


@pytest.mark.parametrize("path", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    assert path.exists(), f"{path.relative_to(ROOT)} is missing"
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading '#{anchor}' in {dest.relative_to(ROOT)}")
    assert not broken, f"{path.relative_to(ROOT)}: " + "; ".join(broken)


def test_readme_is_short() -> None:
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines (at most "
                                       f"{README_MAX_LINES}); move detail into docs/")


@pytest.mark.parametrize("path", USER_TEXT, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_notebook_phrases(path: Path) -> None:
    text = path.read_text(encoding="utf-8").lower()
    found = [p.strip() for p in NOTEBOOK_PHRASES if p in text]
    assert not found, f"{path.relative_to(ROOT)} reads like a lab notebook: {found}"


@pytest.mark.parametrize("path", USER_TEXT, ids=lambda p: str(p.relative_to(ROOT)))
def test_shown_commands_exist(path: Path) -> None:
    shown = {name for block in _code(path.read_text(encoding="utf-8"))
             for name in COMMAND.findall(block)}
    assert shown, f"{path.relative_to(ROOT)} shows no stn-deploy command"
    missing = sorted(shown - set(COMMANDS))
    assert not missing, f"{path.relative_to(ROOT)} shows commands the CLI lacks: {missing}"


def command_lines(text: str) -> list[str]:
    """Each ``stn-deploy ...`` line of the fenced code blocks (continuations joined, comments
    dropped) and each inline code span that starts with ``stn-deploy``."""
    lines = []
    for block in FENCE.finditer(text):
        joined = re.sub(r"\\\n\s*", " ", block.group(0))
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("stn-deploy "):
                lines.append(line)
    spans = (span.strip("`") for span in INLINE_CODE.findall(FENCE.sub("", text)))
    return lines + [span for span in spans if span.startswith("stn-deploy ")]


def shown_line_errors(line: str) -> list[str]:
    """What is wrong with one documented command line: options the command does not take,
    and values outside an option's choices (``--format trt`` where only ``engine`` exists)."""
    words = shlex.split(line)
    if len(words) < 2 or words[1] not in COMMANDS:
        return []  # test_shown_commands_exist names these
    command = cli.get_command(click.Context(cli), words[1])
    assert command is not None
    start = 2
    while isinstance(command, click.Group) and start < len(words) \
            and words[start] in command.commands:  # a subcommand: `debug compare`
        command = command.commands[words[start]]
        start += 1
    by_name: dict[str, click.Parameter | None] = {"--help": None, "-h": None}
    for param in command.params:
        by_name.update({name: param for name in [*param.opts, *param.secondary_opts]})
    errors = []
    for i, word in enumerate(words[start:], start=start):
        name, _, inline_value = word.partition("=")
        if not word.startswith("-") or word == "-":
            continue
        if name not in by_name:
            errors.append(f"{words[1]} {name}")
            continue
        param = by_name[name]
        if isinstance(param, click.Option) and isinstance(param.type, click.Choice) \
                and not param.is_flag:
            value = inline_value or (words[i + 1] if i + 1 < len(words) else "")
            allowed = {str(c) for c in param.type.choices}
            allowed |= set(getattr(param.type, "aliases", {}))
            if value not in allowed:
                errors.append(f"{words[1]} {name} {value}")
    return errors


def test_the_line_checker_catches_a_stale_option_and_value() -> None:
    assert shown_line_errors("stn-deploy bench --no-such-option 3") == ["bench --no-such-option"]
    assert shown_line_errors("stn-deploy export --precision fp64") == ["export --precision fp64"]
    assert shown_line_errors("stn-deploy export --precision int8 --opset=16 --help") == []


@pytest.mark.parametrize("path", USER_TEXT, ids=lambda p: str(p.relative_to(ROOT)))
def test_shown_options_exist(path: Path) -> None:
    """Every option on a documented command line is one the command takes, with a value among
    its choices, so a renamed option cannot leave the docs teaching the old name."""
    wrong = [e for line in command_lines(path.read_text(encoding="utf-8"))
             for e in shown_line_errors(line)]
    assert not wrong, (f"{path.relative_to(ROOT)} shows options the CLI does not take: "
                       + ", ".join(sorted(set(wrong))))


def test_shipped_model_figures_agree_with_its_record() -> None:
    """The shipped model's accuracy and STN health, as the README's results summary and the
    results page state them, are those its record measured (the ONNX file by ONNX Runtime
    alone), and the record's recipe is the named recipe users train with."""
    import json

    from stn_deploy.pretrained.card import model_card
    from stn_deploy.training.options import RECIPES

    folder = ROOT / "stn_deploy" / "pretrained"
    for record_path in sorted(folder.glob("*.json")):
        record = json.loads(record_path.read_text())
        name = record["name"]
        accuracy = f"{100 * record['onnx_accuracy']:.2f}%"
        rotation = f"{100 * record['stn_health_rts']['undone']['rotation']:.0f}% of the rotation"
        assert (folder / f"{name}.md").read_text() == model_card(record)
        assert record["recipe_values"] == json.loads(json.dumps(RECIPES[record["recipe"]]))
        for doc in (README, ROOT / "docs" / "results.md"):
            rows = [line for line in doc.read_text().splitlines()
                    if line.startswith("|") and f"`{name}`" in line and "shipped" in line
                    and "INT8" not in line]
            assert rows, f"{doc.name} has no row for the shipped {name}"
            for row in rows:
                assert accuracy in row and rotation in row, (doc.name, row)
                assert record["data"] in row, (doc.name, row)
