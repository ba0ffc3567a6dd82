"""mkdocs hook: render the Sphinx roles of the docstrings (``:class:`~kappatune.KappaTable```) as code.

The docstrings are written for both ``help()`` and this site; mkdocstrings renders them as
Markdown, where a role such as ``:func:`kappatune.scan``` would show its ``:func:`` prefix. This
hook drops the prefix and, as Sphinx does for a leading ``~``, shows only the last name.
"""

import re

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|data|mod|exc|obj|const):<code>(~?)([^<]+)</code>")


def _sub(m: "re.Match") -> str:
    tilde, target = m.groups()
    return f"<code>{target.rsplit('.', 1)[-1] if tilde else target}</code>"


def on_page_content(html, **kwargs):
    return ROLE.sub(_sub, html)
