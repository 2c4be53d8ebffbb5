// A virtualised list of fixed-height rows: only the rows in view (plus a margin) are in the DOM, so a
// log of 100,000 events scrolls as easily as one of 10. Follows the tail while scrolled to the bottom.

import { el } from "./util.js";

const OVERSCAN = 12;

export class VirtualList {
  // renderRow(node, index) fills a recycled row element for the row at `index`.
  constructor({ rowHeight, renderRow, onFollowChange }) {
    this.rowHeight = rowHeight;
    this.renderRow = renderRow;
    this.onFollowChange = onFollowChange || (() => {});
    this.count = 0;
    this.follow = true;
    this.spacer = el("div", { class: "vl-spacer" });
    this.viewport = el("div", { class: "vl-viewport", tabindex: "0", role: "log", "aria-live": "off" }, this.spacer);
    this.pool = [];
    this.generation = 0;
    this.scheduled = false;
    this.programmaticTop = null; // the scrollTop this list set itself (its scroll event is not the user's)
    this.viewport.addEventListener("scroll", () => {
      const top = this.viewport.scrollTop;
      if (this.programmaticTop === null || Math.abs(top - this.programmaticTop) > 1) {
        // measured against the rows we hold, not the spacer's current height, which lags a frame
        // behind a count change: a scroll to the top right after rows arrive must stop following
        const atBottom = top + this.viewport.clientHeight >= this.count * this.rowHeight - this.rowHeight;
        if (atBottom !== this.follow) {
          this.follow = atBottom;
          this.onFollowChange(atBottom);
        }
      }
      this.programmaticTop = null;
      this.schedule();
    }, { passive: true });
    new ResizeObserver(() => this.schedule()).observe(this.viewport);
  }

  setCount(n) {
    this.count = n;
    this.schedule();
  }

  setFollow(on) {
    this.follow = on;
    this.schedule();
  }

  // Re-render the visible rows (after a filter change or new data), once per animation frame.
  schedule() {
    if (this.scheduled) return;
    this.scheduled = true;
    requestAnimationFrame(() => {
      this.scheduled = false;
      this.render();
    });
  }

  render() {
    const h = this.rowHeight;
    this.spacer.style.height = `${this.count * h}px`;
    const vp = this.viewport;
    if (this.follow) {
      const bottom = Math.max(0, this.count * h - vp.clientHeight);
      if (Math.abs(vp.scrollTop - bottom) > 1) {
        this.programmaticTop = bottom;
        vp.scrollTop = bottom;
      }
    }
    const first = Math.max(0, Math.floor(vp.scrollTop / h) - OVERSCAN);
    const last = Math.min(this.count, Math.ceil((vp.scrollTop + vp.clientHeight) / h) + OVERSCAN);
    const need = Math.max(0, last - first);
    while (this.pool.length < need) {
      const node = el("div", { class: "vl-row" });
      this.pool.push(node);
      this.spacer.append(node);
    }
    for (let i = 0; i < this.pool.length; i++) {
      const node = this.pool[i];
      if (i < need) {
        const index = first + i;
        node.style.transform = `translateY(${index * h}px)`;
        node.hidden = false;
        if (node._index !== index || node._stale !== this.generation) {
          node._index = index;
          node._stale = this.generation;
          this.renderRow(node, index);
        }
      } else if (!node.hidden) {
        node.hidden = true;
        node._index = -1;
      }
    }
  }

  // Rows' content changed (a filter): every visible row is filled again on the next render.
  invalidate() {
    this.generation++;
    this.schedule();
  }

  scrollToIndex(index) {
    this.follow = false;
    this.onFollowChange(false);
    this.viewport.scrollTop = Math.max(0, index * this.rowHeight - this.viewport.clientHeight / 2);
    this.schedule();
  }
}
