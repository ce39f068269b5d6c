"""An mkdocs hook: README.md's links into docs/ are checked like the manual's own, so `make docs` fails on a
README link to a page or an anchor that does not exist (mkdocs itself reads only docs/)."""
import re
from pathlib import Path

from mkdocs.exceptions import PluginError

LINK = re.compile(r"\]\((docs/[^)#\s]*)(?:#([^)\s]*))?\)")
anchors_by_page: dict[str, set[str]] = {}


def collect_anchors(items, into: set[str]) -> None:
    for item in items:
        into.add(item.id)
        collect_anchors(item.children, into)


def on_page_content(html, page, config, files):
    anchors = set()
    collect_anchors(page.toc.items, anchors)
    anchors_by_page[page.file.src_uri] = anchors
    return html


def on_post_build(config):
    readme = Path(config.config_file_path).parent / "README.md"
    problems = []
    for number, line in enumerate(readme.read_text().splitlines(), 1):
        for target, anchor in LINK.findall(line):
            page = target.removeprefix("docs/") or "index.md"
            if page not in anchors_by_page:
                problems.append(f"README.md:{number}: {target} is not a page of the manual")
            elif anchor and anchor not in anchors_by_page[page]:
                problems.append(f"README.md:{number}: {target} has no anchor #{anchor}")
    if problems:
        raise PluginError("broken links in README.md:\n  " + "\n  ".join(problems))
