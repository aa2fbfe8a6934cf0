import { LabIcon } from '@jupyterlab/ui-components';

// A chip with pins; `jp-icon3` lets the theme recolour it.
const GPU_SVG = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <path d="M9 1.5h2v3H9zM13 1.5h2v3h-2zM9 19.5h2v3H9zM13 19.5h2v3h-2zM1.5 9h3v2h-3zM1.5 13h3v2h-3zM19.5 9h3v2h-3zM19.5 13h3v2h-3z"/>
    <path d="M5 5h14v14H5V5zm2 2v10h10V7H7z"/>
    <path d="M9.5 9.5h5v5h-5z"/>
  </g>
</svg>`;

export const gpuIcon = new LabIcon({ name: 'harp-jupyter:gpu', svgstr: GPU_SVG });
