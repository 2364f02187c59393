"""
An MkDocs hook (see mkdocs.yml): links from a page to a file of the
repository outside docs/ (C{../bench/results/x.json}, C{../bench/README.md})
work on GitHub, where the repository is browsed; on the site the hook
copies each such file into the site under C{repo/} and points the link
there, so MkDocs checks it like any other (a link to a file that does not
exist still fails C{mkdocs build --strict}).

Files copied are served as they are (a Markdown file as text, not as a
page: it was written to be read on GitHub).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

#: Where the copies go in the site.
PREFIX = "repo/"

# A Markdown link or image target that climbs out of docs/: ](../path) or
# ](../path#anchor). Targets with a scheme never start with "..".
_OUTSIDE = re.compile(r"\]\(((?:\.\./)+)([^)#\s]+)(#[^)\s]*)?\)")


def _targets(page_path: Path, docs_dir: Path, text: str) -> list[tuple[str, Path]]:
    """(the link as written, the repository file it names) for each link out of docs/."""
    found = []
    for match in _OUTSIDE.finditer(text):
        target = (page_path.parent / (match.group(1) + match.group(2))).resolve()
        if not target.is_relative_to(docs_dir):
            found.append((match.group(1) + match.group(2), target))
    return found


def _copy_uri(target: Path, repo: Path) -> str:
    """
    Where the copy of C{target} goes in the site. A Markdown file gets
    C{.txt} added: MkDocs would make a page of a C{.md}, with links that
    were written for GitHub.
    """
    uri = PREFIX + target.relative_to(repo).as_posix()
    return uri + ".txt" if uri.endswith(".md") else uri


def on_files(files: Files, config: Any) -> Files:
    """Add a copy of every repository file a page links to outside docs/."""
    docs_dir = Path(config["docs_dir"]).resolve()
    repo = docs_dir.parent
    wanted: set[Path] = set()
    for file in files.documentation_pages():
        path = Path(file.abs_src_path or "")
        for _, target in _targets(path, docs_dir, path.read_text(encoding="utf-8")):
            if target.is_file() and target.is_relative_to(repo):
                wanted.add(target)
    for target in sorted(wanted):
        files.append(File.generated(config, _copy_uri(target, repo), abs_src_path=str(target)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Point the links out of docs/ at the copies (relative to the page)."""
    docs_dir = Path(config["docs_dir"]).resolve()
    repo = docs_dir.parent
    up = "../" * page.file.src_uri.count("/")
    for written, target in _targets(Path(page.file.abs_src_path), docs_dir, markdown):
        if target.is_relative_to(repo):
            markdown = markdown.replace(f"]({written}", f"]({up}{_copy_uri(target, repo)}")
    return markdown
