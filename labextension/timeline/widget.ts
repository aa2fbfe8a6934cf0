/**
 * TimelineWidget: draws a `%%harp profile` (tracks of spans on one clock) with zoom (wheel),
 * pan (drag), hover details, and the summary and sync-point advice below it. Used inline by the
 * MIME renderer and in the sidebar's timeline view.
 */

import { Widget } from '@lumino/widgets';

import { formatBytes } from '../format';

import {
  batchedLine,
  buildTracks,
  extent,
  fitText,
  formatMicros,
  labelColumn,
  pan,
  Span,
  TimelineData,
  Track,
  View,
  visibleSpans,
  zoom
} from './layout';

const SVG = 'http://www.w3.org/2000/svg';
const ROW = 20;
/** px per character of an 11 px label, for when the SVG cannot measure (not in the page) */
const CHAR_WIDTH = 6.2;
const LABEL_GAP = 10;

export class TimelineWidget extends Widget {
  constructor(data?: TimelineData) {
    super();
    this.addClass('harp-Timeline');
    this._header = document.createElement('div');
    this._header.className = 'harp-Timeline-header';
    this._canvas = document.createElementNS(SVG, 'svg') as SVGSVGElement;
    this._canvas.classList.add('harp-Timeline-canvas');
    this._tip = document.createElement('div');
    this._tip.className = 'harp-Timeline-tip';
    this._details = document.createElement('div');
    this._details.className = 'harp-Timeline-details';
    const frame = document.createElement('div');
    frame.className = 'harp-Timeline-frame';
    frame.append(this._canvas, this._tip);
    this.node.append(this._header, frame, this._details);
    this._canvas.addEventListener('wheel', this._onWheel, { passive: false });
    this._canvas.addEventListener('mousedown', this._onDown);
    this._canvas.addEventListener('mousemove', this._onHover);
    this._canvas.addEventListener('mouseleave', () => (this._tip.style.display = 'none'));
    if (data) {
      this.setData(data);
    }
  }

  setData(data: TimelineData): void {
    this._data = data;
    this._tracks = buildTracks(data.trace.traceEvents);
    this._limits = extent(this._tracks, data.summary.wall_s * 1e6);
    this._view = { start: this._limits[0], end: this._limits[1] };
    this._renderHeader();
    this._renderDetails();
    this.draw();
  }

  get tracks(): Track[] {
    return this._tracks;
  }

  /** Redraw the tracks for the current view. */
  draw(): void {
    const svg = this._canvas;
    svg.replaceChildren();
    this._drawnWidth = this.node.clientWidth;
    const style = getComputedStyle(this.node);
    const padding = (parseFloat(style.paddingLeft) || 0) + (parseFloat(style.paddingRight) || 0);
    const width = Math.max((this._drawnWidth || 0) - padding, 600);
    svg.setAttribute('width', String(width));
    svg.setAttribute('height', String(this._tracks.length * ROW + 18));
    const labels = this._tracks.map((track, row) => {
      const label = document.createElementNS(SVG, 'text');
      label.setAttribute('x', '4');
      label.setAttribute('y', String(row * ROW + 14));
      label.setAttribute('class', 'harp-Timeline-label');
      label.textContent = track.name;
      svg.append(label);
      return label;
    });
    const measure = (label: SVGTextElement) => (text: string): number => {
      label.textContent = text;
      return label.getComputedTextLength() || text.length * CHAR_WIDTH;
    };
    // the label column fits the labels (up to a share of the width); a longer label is cut,
    // never drawn under the bars
    const column = labelColumn(
      labels.map((label, row) => measure(label)(this._tracks[row].name)),
      width
    );
    this._labelWidth = column;
    labels.forEach((label, row) => {
      const track = this._tracks[row];
      label.textContent = fitText(track.name, column - LABEL_GAP, measure(label));
      const title = document.createElementNS(SVG, 'title');
      title.textContent = `${track.process}: ${track.name}`;
      label.append(title);
    });
    const left = column;
    const plot = width - left;
    const view = this._view;
    const scale = plot / (view.end - view.start || 1);
    this._tracks.forEach((track, row) => {
      const y = row * ROW;
      for (const span of visibleSpans(track.spans, view, plot)) {
        const rect = document.createElementNS(SVG, 'rect');
        const x = left + Math.max(0, (span.start - view.start) * scale);
        const right = left + Math.min(plot, (span.end - view.start) * scale);
        rect.setAttribute('x', x.toFixed(1));
        rect.setAttribute('y', String(y + 3));
        rect.setAttribute('width', Math.max(right - x, 1).toFixed(1));
        rect.setAttribute('height', String(ROW - 6));
        rect.setAttribute('class', `harp-Timeline-span harp-cat-${span.cat || 'other'}`);
        this._spans.set(rect, span);
        svg.append(rect);
      }
      for (const instant of visibleSpans(track.instants, view, plot)) {
        const tick = document.createElementNS(SVG, 'rect');
        tick.setAttribute('x', (left + (instant.start - view.start) * scale).toFixed(1));
        tick.setAttribute('y', String(y + 5));
        tick.setAttribute('width', '1');
        tick.setAttribute('height', String(ROW - 10));
        tick.setAttribute('class', 'harp-Timeline-instant');
        this._spans.set(tick, instant);
        svg.append(tick);
      }
    });
    const axis = document.createElementNS(SVG, 'text');
    axis.setAttribute('x', String(left));
    axis.setAttribute('y', String(this._tracks.length * ROW + 14));
    axis.setAttribute('class', 'harp-Timeline-axis');
    axis.textContent =
      `${formatMicros(view.start)} … ${formatMicros(view.end)} ` +
      '(wheel: zoom, drag: pan, double-click: reset)';
    svg.append(axis);
  }

  protected onAfterAttach(): void {
    // an output area never sends resize messages: follow the node's width instead
    this._resizeObserver = new ResizeObserver(() => {
      if (this.node.clientWidth !== this._drawnWidth) {
        this.draw();
      }
    });
    this._resizeObserver.observe(this.node);
  }

  protected onBeforeDetach(): void {
    this._resizeObserver?.disconnect();
    this._resizeObserver = null;
  }

  protected onAfterShow(): void {
    this.draw();
  }

  private _renderHeader(): void {
    const s = this._data?.summary;
    this._header.replaceChildren();
    if (!s) {
      return;
    }
    const device = s.emulated ? 'emulated device (host NumPy time)' : 'GPU';
    const facts = [
      `wall ${formatMicros(s.wall_s * 1e6)}`,
      `${device} busy ${formatMicros(s.gpu_busy_s * 1e6)} (${Math.round(s.gpu_share * 100)}%)`,
      `${s.sync_points} sync points blocked ${formatMicros(s.blocked_s * 1e6)}` +
        ` (${formatMicros(s.network_wait_s * 1e6)} network + agent queue)`,
      `${s.calls} calls in ${s.batches} batches`,
      `↑ ${formatBytes(s.bytes_up)} ↓ ${formatBytes(s.bytes_down)}`
    ];
    for (const fact of facts) {
      const item = document.createElement('span');
      item.className = 'harp-Timeline-fact';
      item.textContent = fact;
      this._header.append(item);
    }
    const reset = document.createElement('button');
    reset.className = 'jp-Button jp-mod-minimal harp-Timeline-reset';
    reset.textContent = 'Reset zoom';
    reset.onclick = () => this._reset();
    this._header.append(reset);
    this._canvas.ondblclick = () => this._reset();
  }

  private _renderDetails(): void {
    const data = this._data;
    this._details.replaceChildren();
    if (!data) {
      return;
    }
    if (data.summary.top_kernels.length) {
      const kernels = document.createElement('div');
      kernels.className = 'harp-Timeline-kernels';
      kernels.textContent =
        'Top kernels: ' +
        data.summary.top_kernels
          .map(k => `${k.name} ×${k.count} ${formatMicros(k.gpu_s * 1e6)}`)
          .join(', ');
      this._details.append(kernels);
    }
    for (const text of [batchedLine(data.summary), data.summary.note]) {
      if (text) {
        const line = document.createElement('div');
        line.className = 'harp-Timeline-kernels';
        line.textContent = text;
        this._details.append(line);
      }
    }
    if (!data.advice.length) {
      return;
    }
    const heading = document.createElement('div');
    heading.className = 'harp-Timeline-adviceHeading';
    heading.textContent = 'Sync points: where the notebook waited for the GPU';
    const table = document.createElement('table');
    table.className = 'harp-Timeline-advice';
    for (const a of data.advice) {
      const row = table.insertRow();
      const where = row.insertCell();
      where.innerHTML = '';
      const site = document.createElement('code');
      site.textContent = a.site;
      where.append(site);
      const code = row.insertCell();
      const text = document.createElement('code');
      text.textContent = a.code;
      code.append(text);
      row.insertCell().textContent = `${a.count}× ${a.op}, ${formatMicros(a.total_s * 1e6)}`;
      row.insertCell().textContent = a.advice;
    }
    this._details.append(heading, table);
  }

  private _reset(): void {
    this._view = { start: this._limits[0], end: this._limits[1] };
    this.draw();
  }

  private _timeAt(clientX: number): number {
    const box = this._canvas.getBoundingClientRect();
    const plot = box.width - this._labelWidth;
    const share = Math.min(
      1,
      Math.max(0, (clientX - box.left - this._labelWidth) / (plot || 1))
    );
    return this._view.start + share * (this._view.end - this._view.start);
  }

  private _onWheel = (event: WheelEvent): void => {
    event.preventDefault();
    const factor = event.deltaY > 0 ? 1.25 : 0.8;
    this._view = zoom(this._view, factor, this._timeAt(event.clientX), this._limits);
    this.draw();
  };

  private _onDown = (event: MouseEvent): void => {
    let last = event.clientX;
    const move = (e: MouseEvent) => {
      const box = this._canvas.getBoundingClientRect();
      const perPixel =
        (this._view.end - this._view.start) / Math.max(box.width - this._labelWidth, 1);
      this._view = pan(this._view, (last - e.clientX) * perPixel, this._limits);
      last = e.clientX;
      this.draw();
    };
    const up = () => {
      window.removeEventListener('mousemove', move);
      window.removeEventListener('mouseup', up);
    };
    window.addEventListener('mousemove', move);
    window.addEventListener('mouseup', up);
  };

  private _onHover = (event: MouseEvent): void => {
    const span = this._spans.get(event.target as Element);
    if (!span) {
      this._tip.style.display = 'none';
      return;
    }
    const lines = [`${span.name}  ${formatMicros(span.end - span.start)}`];
    for (const [key, value] of Object.entries(span.args)) {
      if (value !== '' && value !== null && value !== undefined) {
        lines.push(`${key}: ${String(value)}`);
      }
    }
    this._tip.textContent = lines.join('\n');
    const box = this.node.getBoundingClientRect();
    this._tip.style.left = `${event.clientX - box.left + 12}px`;
    this._tip.style.top = `${event.clientY - box.top + 12}px`;
    this._tip.style.display = 'block';
  };

  private _data: TimelineData | null = null;
  private _drawnWidth = 0;
  private _labelWidth = 120;
  private _resizeObserver: ResizeObserver | null = null;
  private _tracks: Track[] = [];
  private _limits: [number, number] = [0, 1];
  private _view: View = { start: 0, end: 1 };
  private _spans = new WeakMap<Element, Span>();
  private _header: HTMLDivElement;
  private _canvas: SVGSVGElement;
  private _tip: HTMLDivElement;
  private _details: HTMLDivElement;
}
