"""The docs cannot drift from the command: every ``lungdet ...`` command in a fenced block of README.md
or docs/*.md is checked against its subcommand's own argparse parser, and every relative link must
point at a file (and heading) that exists.

A command is a line of a fenced block whose command word is ``lungdet``, ``.venv/bin/lungdet``,
``python -m lungdet`` or ``torchrun ... lungdet``, after any ``VAR=value`` assignments, in any link of
a ``&&`` / ``||`` / ``;`` / ``|`` chain. In a block that uses ``$ `` prompts only prompted lines (and
their backslash continuations) are commands; the rest is output. Subcommands and parsers are taken
from ``lungdet.cli.SUBCOMMANDS``, never from module paths, so modules can move freely.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import re
import shlex
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from lungdet.cli import SUBCOMMANDS

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# Which page documents which subcommands: each must show at least one checked command for each, so
# the test cannot pass because the extractor stopped finding commands on a page.
PAGE_SUBCOMMANDS = {
    "docs/demo.md": {"demo"},
    "docs/convert.md": {"synth", "convert", "eda"},
    "docs/train.md": {"train", "pretrain"},
    "docs/cv_and_tune.md": {"cv", "tune", "predict"},
    "docs/predict_and_export.md": {"predict", "export"},
    "docs/score_and_reports.md": {"score", "visualize"},
    "docs/serve.md": {"serve"},
    "docs/dicom_and_pacs.md": {"predict", "pacs"},
}
MIN_COMMANDS = 40

FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SEPARATORS = {"&&", "||", ";", "|", "&", ";;", "|&"}
# Words that may stand before a command in a shell line (for f in ...; do lungdet ...; done).
PREFIX_WORDS = {"do", "then", "else", "time", "exec", "!"}
# A redirection ends a command's arguments: '>', '2>', '>>', '>/dev/null', '<<JSON', '<in.txt'.
REDIRECT = re.compile(r"^\d*(>>?|<<?)")
PLACEHOLDER = re.compile(r"^<[^<>]+>$")  # <checkpoint>: a value in the docs, not a redirection
# A line that looks like a lungdet command even when shlex cannot split it (an unclosed quote).
LOOKS_LIKE_COMMAND = re.compile(r"(?:^|[;&|]\s*)(?:[A-Za-z_]\w*=\S*\s+)*(?:\S*/)?(?:lungdet|python3?\s+-m\s+lungdet)\s")


@dataclass(frozen=True)
class Command:
    page: str  # relative to the repository root
    line: int  # 1-based line of the command's first physical line
    text: str  # the logical line as written (continuations joined)
    argv: tuple[str, ...]  # what follows the command word: subcommand, flags, values

    def where(self) -> str:
        return f"{self.page}:{self.line}: lungdet {' '.join(self.argv)}"


def closes(fence: str, stripped_line: str) -> bool:
    """A closing fence: the same character, at least as long, and nothing after it (no info string)."""
    run = len(stripped_line) - len(stripped_line.lstrip(fence[0]))
    return run >= len(fence) and not stripped_line[run:].strip()


def fenced_blocks(text: str) -> list[list[tuple[int, str]]]:
    """The fenced code blocks of a Markdown text, as lists of (1-based line number, line)."""
    blocks: list[list[tuple[int, str]]] = []
    fence: str | None = None
    current: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        match = FENCE.match(line)
        if fence is None:
            if match:
                fence, current = match.group(1), []
        elif match and closes(fence, line.strip()):
            blocks.append(current)
            fence = None
        else:
            current.append((number, line))
    return blocks


def logical_lines(block: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Join backslash continuations; in a block with ``$ `` prompts keep only the prompted lines."""
    prompted = any(line.lstrip().startswith("$ ") for _, line in block)
    lines: list[tuple[int, str]] = []
    start, parts, continuing = 0, [], False
    for number, line in block:
        stripped = line.strip()
        if not continuing:
            if prompted:
                if not stripped.startswith("$ "):
                    continue  # command output
                stripped = stripped[2:]
            start, parts = number, []
        continuing = stripped.endswith("\\")
        parts.append(stripped[:-1] if continuing else stripped)
        if not continuing:
            lines.append((start, " ".join(parts)))
    if continuing:
        lines.append((start, " ".join(parts)))
    return lines


def split_shell(text: str) -> list[list[str]]:
    """A shell line's simple commands, split on && || ; | &, comments and redirections dropped."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    segments: list[list[str]] = [[]]
    redirected = False
    for token in lexer:
        if token in SEPARATORS:
            segments.append([])
            redirected = False
        elif redirected or (REDIRECT.match(token) and not PLACEHOLDER.match(token)):
            redirected = True
        else:
            segments[-1].append(token)
    return [segment for segment in segments if segment]


def lungdet_argv(words: list[str]) -> tuple[str, ...] | None:
    """What follows the lungdet command word in one simple command, or None if it is another command."""
    index = 0
    while index < len(words) and (ENV_ASSIGNMENT.match(words[index]) or words[index] in PREFIX_WORDS):
        index += 1
    words = words[index:]
    if not words:
        return None
    head = words[0]
    if head == "lungdet" or head.endswith("/bin/lungdet"):
        return tuple(words[1:])
    if Path(head).name in ("python", "python3") and words[1:3] == ["-m", "lungdet"]:
        return tuple(words[3:])
    if Path(head).name == "torchrun" and "lungdet" in words:
        return tuple(words[words.index("lungdet") + 1 :])
    return None


def extract_commands(page: Path) -> tuple[list[Command], list[str]]:
    """Every lungdet command in the page's fenced blocks, and the lines that could not be split."""
    relative = page.relative_to(REPO).as_posix()
    commands: list[Command] = []
    problems: list[str] = []
    for block in fenced_blocks(page.read_text(encoding="utf-8")):
        for number, text in logical_lines(block):
            try:
                segments = split_shell(text)
            except ValueError as error:  # an unclosed quote: fine in output, not in a command
                if LOOKS_LIKE_COMMAND.search(text):
                    problems.append(f"{relative}:{number}: {text}: cannot split it as a shell line ({error})")
                continue
            for words in segments:
                argv = lungdet_argv(words)
                if argv is not None:
                    commands.append(Command(relative, number, text, argv))
    return commands, problems


class ParseFailed(Exception):
    pass


def _raise_instead_of_exit(message: str) -> None:
    raise ParseFailed(message)


def build_parser(subcommand: str) -> argparse.ArgumentParser:
    # A fresh parser per command: parse_intermixed_args changes actions while it runs.
    parser = importlib.import_module(SUBCOMMANDS[subcommand][0]).get_args_parser()
    parser.error = _raise_instead_of_exit  # type: ignore[method-assign]
    return parser


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def check_command(command: Command) -> list[str]:
    """What is wrong with one documented command, as messages naming its page and line."""
    argv = list(command.argv)
    if not argv or argv[0] in ("-h", "--help"):
        return []  # bare `lungdet` and `lungdet --help` print the usage
    subcommand, rest = argv[0], argv[1:]
    if subcommand not in SUBCOMMANDS:
        close = difflib.get_close_matches(subcommand, SUBCOMMANDS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return [f"{command.where()}: no subcommand '{subcommand}'{hint}"]
    parser = build_parser(subcommand)
    known = option_strings(parser)
    errors = []
    for token in rest:
        # '-1' or '-0.5' would be a value; every lungdet flag starts with a letter after its dashes.
        if not token.startswith("-") or token == "-" or re.match(r"^-\d", token):
            continue
        option = token.split("=", 1)[0]
        if option not in known:
            close = difflib.get_close_matches(option, sorted(known), n=1)
            if close:
                hint = f" (did you mean {close[0]}?)"
            elif any(action.metavar == "KEY=VALUE" for action in parser._actions):
                hint = " (config keys are set as KEY=VALUE overrides, e.g. optim.epochs=3, not as flags)"
            else:
                hint = ""
            errors.append(f"{command.where()}: no option {option}{hint}")
    if errors or "-h" in rest or "--help" in rest:
        return errors
    # The parsers' type= callables only parse text (Path, numbers, WxH, fold lists): parsing reads no
    # file, so a missing required option or a bad choice is caught too.
    try:
        parser.parse_intermixed_args(rest)
    except ParseFailed as error:
        return [f"{command.where()}: {error}"]
    except SystemExit as error:  # an action that exits (--version and the like)
        return [f"{command.where()}: the parser exited ({error.code})"]
    return []


def all_commands() -> tuple[list[Command], list[str]]:
    commands: list[Command] = []
    problems: list[str] = []
    for page in PAGES:
        found, unsplittable = extract_commands(page)
        commands += found
        problems += unsplittable
    return commands, problems


def test_every_documented_command_parses() -> None:
    commands, problems = all_commands()
    for command in commands:
        problems += check_command(command)
    assert not problems, f"{len(problems)} documented command(s) do not match the CLI:\n" + "\n".join(problems)

    # Not vacuous: the extractor found commands, on every page that documents a subcommand.
    assert len(commands) >= MIN_COMMANDS, f"found only {len(commands)} lungdet commands in {len(PAGES)} pages"
    shown: dict[str, set[str]] = {}
    for command in commands:
        if command.argv:
            shown.setdefault(command.page, set()).add(command.argv[0])
    missing = [
        f"{page}: no fenced `lungdet {name} ...` command found"
        for page, names in PAGE_SUBCOMMANDS.items()
        for name in sorted(names - shown.get(page, set()))
    ]
    # The README's pipeline screen shows every subcommand once, so a new one gets documented.
    missing += [
        f"README.md: no fenced `lungdet {name} ...` example"
        for name in sorted(set(SUBCOMMANDS) - shown.get("README.md", set()))
    ]
    assert not missing, "\n".join(missing)


# --- links -------------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"`[^`]*`")


def outside_fences(text: str) -> list[tuple[int, str]]:
    """The lines outside fenced blocks, as (1-based line number, line)."""
    inside = {number for block in fenced_blocks(text) for number, _ in block}
    lines = text.splitlines()
    # The fence lines themselves belong to no block's lines; they are not prose either.
    fence_lines = {number for number, line in enumerate(lines, start=1) if FENCE.match(line)}
    return [
        (number, line)
        for number, line in enumerate(lines, start=1)
        if number not in inside and number not in fence_lines
    ]


def github_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lowercased, punctuation dropped, spaces to '-'."""
    anchors: set[str] = set()
    for _, line in outside_fences(page.read_text(encoding="utf-8")):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        text = re.sub(r"<[^>]+>", "", heading.group(1)).replace("`", "").lower()
        slug = "".join(char for char in text if char in " -_" or unicodedata.category(char)[0] in "LN").replace(
            " ", "-"
        )
        anchor, n = slug, 1
        while anchor in anchors:  # repeated headings get -1, -2, ...
            anchor, n = f"{slug}-{n}", n + 1
        anchors.add(anchor)
    return anchors


def test_every_relative_link_points_at_something_that_exists() -> None:
    broken = []
    n_links = 0
    for page in PAGES:
        relative = page.relative_to(REPO).as_posix()
        for number, line in outside_fences(page.read_text(encoding="utf-8")):
            for target in LINK.findall(INLINE_CODE.sub("", line)):  # a link in inline code is not a link
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                    continue
                n_links += 1
                path_part, _, anchor = target.partition("#")
                destination = (page.parent / path_part).resolve() if path_part else page
                if not destination.exists():
                    broken.append(f"{relative}:{number}: {target}: no such file")
                elif anchor and destination.suffix == ".md" and anchor not in github_anchors(destination):
                    broken.append(f"{relative}:{number}: {target}: no heading with anchor #{anchor}")
    assert not broken, "broken links:\n" + "\n".join(broken)
    assert n_links >= 20, f"found only {n_links} relative links: is the link pattern broken?"


def test_every_page_that_shows_predictions_says_research_use_only() -> None:
    # A page with a picture of boxes, a submission or a score must not read as a clinical claim.
    shows_predictions = re.compile(r"!\[|patientId,PredictionString|RSNA mAP|\"prediction_string\":")
    unmarked = [
        page.relative_to(REPO).as_posix()
        for page in PAGES
        if shows_predictions.search(text := page.read_text(encoding="utf-8"))
        and "not a diagnostic device" not in text.lower()
    ]
    assert not unmarked, "pages that show predictions without the research-use notice: " + ", ".join(unmarked)
