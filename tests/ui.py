"""Headless Chromium (Debian's, driven by Playwright) over the MLflow 3.17 UI: what a reader of this
project's runs sees. Each check opens its page in a fresh browser context (no localStorage: a new
user's defaults), screenshots it, then asserts with a message that says what was on the page.

The UI is a single-page app that fetches after it renders: every wait is for a role or a text, with
generous timeouts, never a fixed sleep alone. Tables are ag-grid, which renders only the columns in
view, so `grid_rows` scrolls the grid sideways and reads it by column headers.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

CHROMIUM = "/usr/bin/chromium"
# Playwright's own browser builds are not used (nor downloadable offline): Debian's chromium, with
# nothing reaching out of the machine.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 90_000  # the SPA on a busy 2-core machine
VIEWPORT = {"width": 1600, "height": 1000}
# MLflow 3.17 opens its assistant panel over a third of the page on a browser's first visit; these
# two keys are what closing it leaves. Nothing else is set: the workflow type (GenAI or model
# training) and the runs table's columns stay a new user's defaults.
CLOSE_ASSISTANT = ("localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
                   "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');")
LINK_PREFIX = "view in MLflow: "
# MLflow 3's GenAI overview (where a plain experiment link lands by default) shows these.
GENAI_MARKERS = ("Detect Issues", "Token Usage")


def chromium_path() -> str | None:
    return shutil.which("chromium") or (CHROMIUM if os.access(CHROMIUM, os.X_OK) else None)


def missing() -> str | None:
    """Why the UI checks cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed: pip install -r requirements-dev.txt"
    if chromium_path() is None:
        return ("chromium is not installed: run `make install-services` as root (Debian's chromium), "
                "then the UI checks run")
    return None


@contextmanager
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=ARGS)
        try:
            yield b
        finally:
            b.close()


@contextmanager
def fresh_page(b):
    """A new user's tab: empty storage but for the closed assistant panel."""
    context = b.new_context(viewport=VIEWPORT)
    context.add_init_script(CLOSE_ASSISTANT)
    context.set_default_timeout(TIMEOUT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


def printed_link(stderr: str) -> str | None:
    """The last `view in MLflow: <url>` line a command printed."""
    found = [line[len(LINK_PREFIX):].strip() for line in stderr.splitlines() if line.startswith(LINK_PREFIX)]
    return found[-1] if found else None


def body_text(page) -> str:
    return " ".join(page.inner_text("body").split())


def where(page) -> str:
    """The page in one line, for a failure message."""
    return f"{page.url} showing: {body_text(page)[:600]}"


def wait_for(page, locator, what: str) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        locator.first.wait_for(state="visible")
    except PlaywrightTimeout:
        raise AssertionError(f"{what} did not appear within {TIMEOUT_MS // 1000} s at {where(page)}") from None


def shoot(page, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    page.wait_for_timeout(500)  # let the last fetch paint
    page.screenshot(path=str(path))


def runs_url(base: str, experiment_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def models_url(base: str, experiment_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/models?workflowType=machine_learning"


def compare_url(base: str, experiment_id: str, run_ids: list[str]) -> str:
    runs, experiments = quote(json.dumps(run_ids)), quote(json.dumps([experiment_id]))
    return f"{base}/#/compare-runs?runs={runs}&experiments={experiments}&workflowType=machine_learning"


def version_url(base: str, name: str, version: str) -> str:
    return f"{base}/#/models/{quote(name)}/versions/{version}?workflowType=machine_learning"


# ag-grid renders the columns in view only: scroll the first grid sideways, most of a screen at a time,
# and read every header (col-id -> text) and cell (row-id -> col-id -> text) it rendered on the way.
_READ_GRID = """async () => {
  const grid = document.querySelector('.ag-root');
  if (!grid) return null;
  const headers = {}, rows = {};
  const read = () => {
    grid.querySelectorAll('[role=columnheader][col-id]').forEach(h => {
      headers[h.getAttribute('col-id')] = h.innerText.trim(); });
    grid.querySelectorAll('[role=row][row-id]').forEach(r => {
      const row = rows[r.getAttribute('row-id')] ??= {};
      r.querySelectorAll('[role=gridcell][col-id]').forEach(c => {
        row[c.getAttribute('col-id')] = c.innerText.trim(); });
    });
  };
  // the grid's own horizontal scrollbar: ag-grid moves the header and the body with it
  const bar = grid.querySelector('.ag-body-horizontal-scroll-viewport');
  const width = bar ? bar.scrollWidth : 0;
  const step = Math.max(200, Math.floor((bar ? bar.clientWidth : 1000) * 0.8));
  for (let x = 0; ; x += step) {
    if (bar) { bar.scrollLeft = x; bar.dispatchEvent(new Event('scroll')); }
    await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => setTimeout(r, 100))));
    read();
    if (x >= width) break;
  }
  if (bar) { bar.scrollLeft = 0; bar.dispatchEvent(new Event('scroll')); }
  return {headers, rows};
}"""


_SCROLL_GRID_TO = """async (title) => {
  const header = [...document.querySelectorAll('.ag-root [role=columnheader][col-id]')]
    .find(h => h.innerText.trim() === title);
  if (!header) return;
  const bar = document.querySelector('.ag-root .ag-body-horizontal-scroll-viewport');
  if (!bar) return;
  bar.scrollLeft = header.offsetLeft;
  bar.dispatchEvent(new Event('scroll'));
  await new Promise(r => setTimeout(r, 500));
}"""


def grid_rows(page) -> list[dict[str, str]]:
    """Every row of the page's table as {column header: cell text} (a header over several columns,
    e.g. one metric under two datasets, keeps its non-empty cell)."""
    grid = page.evaluate(_READ_GRID)
    assert grid is not None, f"no table at {where(page)}"
    headers = {html.unescape(k): v for k, v in grid["headers"].items()}
    out = []
    for row_id, cells in grid["rows"].items():
        if not cells:
            continue
        row = {"row-id": row_id}
        for col_id, text in cells.items():
            # a cell's col-id may come HTML-escaped where its header's is not (metric columns)
            header = headers.get(html.unescape(col_id), col_id)
            if text or header not in row:
                row[header] = text
        out.append(row)
    return out


def run_name_of(cell: str) -> str:
    """A runs-table name cell reads '#2272b4\\nstudy-ui' (the colour swatch, then the name)."""
    return cell.splitlines()[-1].strip() if cell else ""


# --- the checks ---------------------------------------------------------------------------------


def check_link_lands_on_runs(page, link: str | None, run_names: list[str], shot: Path, what: str) -> None:
    """(1) The link a command printed opens the experiment's runs list, not the GenAI overview."""
    assert link, f"{what} printed no '{LINK_PREFIX}<url>' line on stderr"
    page.goto(link)
    names = [page.get_by_role("link", name=n, exact=True) for n in run_names]
    landed = names[0]
    for marker in GENAI_MARKERS:
        landed = landed.or_(page.get_by_text(marker, exact=True))
    wait_for(page, landed, f"the run {run_names[0]!r} (or MLflow's GenAI overview)")
    shoot(page, shot)
    text = body_text(page)
    genai = [m for m in GENAI_MARKERS if m in text]
    assert not genai, f"{what}'s link {link} opened MLflow's GenAI overview ({genai}) at {where(page)}"
    assert "/runs" in page.url, f"{what}'s link {link} did not open the runs list: {where(page)}"
    absent = [n for n, loc in zip(run_names, names, strict=True) if not loc.first.is_visible()]
    assert not absent, f"{what}'s link {link} opened a runs list without {absent}: {where(page)}"


def any_run(page, run_names: list[str]):
    """A link to any of these runs (a study's trials are hidden until it is expanded)."""
    found = page.get_by_role("link", name=run_names[0], exact=True)
    for name in run_names[1:]:
        found = found.or_(page.get_by_role("link", name=name, exact=True))
    return found


def expand_parents(page, run_names: list[str]) -> list[dict[str, str]]:
    """The runs table with every parent run expanded (a study's trials show under it)."""
    rows = grid_rows(page)
    for _ in range(3):
        shown = {run_name_of(r.get("Run Name", "")) for r in rows}
        if set(run_names) <= shown:
            break
        # a parent's name cell holds one button, its expander (no accessible name in MLflow 3.17)
        for button in page.locator("[role=gridcell][col-id='attributes.`Run Name`']").get_by_role("button").all():
            button.click()
        page.wait_for_timeout(1000)
        rows = grid_rows(page)
    return rows


def check_runs_have_models(page, url: str, run_names: list[str], shot: Path) -> None:
    """(2) In the runs table every run row (study and trials included) names a model in its Models column."""
    page.goto(url)
    wait_for(page, any_run(page, run_names), f"any of the runs {run_names}")
    wait_for(page, page.get_by_role("columnheader", name="Models"), "the runs table's Models column")
    rows = expand_parents(page, run_names)
    shoot(page, shot)
    models = {run_name_of(r.get("Run Name", "")): r.get("Models", "") for r in rows}
    absent = [n for n in run_names if n not in models]
    assert not absent, f"runs missing from the runs table: {absent}; it shows {sorted(models)}"
    without = {n: models[n] for n in run_names if models[n] in ("", "-")}
    assert not without, (f"runs with no model in the runs table's Models column: {sorted(without)} "
                         f"(all: {[(n, models[n]) for n in run_names]})")


def check_models_tab(page, url: str, expected: dict[str, str], shot: Path) -> None:
    """(3) The experiment's Models tab lists a logged model of every run in `expected` (run name ->
    the metric prefix its linked held-out metrics start with: 'test/accuracy' or 'val/') with a value."""
    page.goto(url)
    grid_or_empty = page.get_by_role("gridcell").or_(page.get_by_text("No models", exact=False))
    wait_for(page, grid_or_empty, "the Models tab's table")
    wait_for(page, page.get_by_role("columnheader", name="Source run"), "the Models tab's 'Source run' column")
    page.wait_for_timeout(1000)
    rows = grid_rows(page)
    # the picture: the table scrolled to 'Source run', so the first metric columns are in view
    page.evaluate(_SCROLL_GRID_TO, "Source run")
    shoot(page, shot)

    def metrics(row):
        return {k: v for k, v in row.items() if "/" in k and re.fullmatch(r"-?[\d.]+(e-?\d+)?", v or "")}

    by_run: dict[str, dict[str, str]] = {}
    for row in rows:
        if row.get("Source run"):
            by_run.setdefault(row["Source run"], {}).update(metrics(row))
    absent = [n for n in expected if n not in by_run]
    assert not absent, (f"the Models tab lists no logged model of {absent}; it lists models of "
                        f"{sorted(by_run)}")
    bare = {n: sorted(by_run[n]) for n, want in expected.items()
            if not any(k == want or (want.endswith("/") and k.startswith(want)) for k in by_run[n])}
    assert not bare, ("logged models without their held-out metric in the Models tab "
                      f"(run: metrics shown): {bare}; wanted {expected}")


def check_compare_starts_with_results(page, url: str, shot: Path) -> list[str]:
    """(4) The compare page's metric rows start with result metrics (`test/...`). Returns the first keys."""
    page.goto(url)
    plot_links = page.get_by_title("Plot chart")  # each metric row's name links to its chart
    wait_for(page, plot_links, "the compare page's metric rows")
    page.wait_for_timeout(1000)
    # the picture: the Metrics section's header near the top, its first rows below
    plot_links.first.evaluate("e => e.scrollIntoView({block: 'start'})")
    page.mouse.wheel(0, -220)
    shoot(page, shot)
    keys = [k.strip() for k in plot_links.all_inner_texts()][:8]
    assert keys and keys[0].startswith("test/"), (
        f"the compare page's metric rows start with {keys[:5]}, not with result metrics (test/...)")
    return keys


def check_version_description(page, url: str, version: str, sentence: str, shot: Path) -> None:
    """(5) The registered version's page shows the gate's decision sentence as its description."""
    page.goto(url)
    wait_for(page, page.get_by_text(f"Version {version}", exact=True), f"the page of version {version}")
    header = page.get_by_role("button", name=re.compile(r"^\s*Description"))
    wait_for(page, header, "the version's Description section")
    if header.first.get_attribute("aria-expanded") == "false":
        header.first.click()
    content = header.first.locator("xpath=following-sibling::*[1]")
    page.wait_for_timeout(1000)
    shoot(page, shot)
    shown = " ".join(content.inner_text().split()) if content.count() else ""
    assert shown == " ".join(sentence.split()), (
        f"version {version}'s description is {shown!r}, not the gate's decision {sentence!r}")
