/**
 * Calls to the harp_jupyter server extension over the lab's ServerConnection (token, XSRF and base
 * URL handled by the lab). Every failure becomes a HarpAPIError with the server's kind, message and
 * hint, or one this module writes when the server did not answer with the contract's error JSON.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

import type {
  IKernelReply,
  IKernelsReply,
  ILeaseAPI,
  IPoolReply,
  IUserError
} from './tokens';

export const API_ROOT = 'harp/api';

export class HarpAPIError extends Error implements IUserError {
  readonly kind: string;
  readonly hint: string;
  /** HTTP status, 0 when no response came back. */
  readonly status: number;

  constructor(status: number, kind: string, message: string, hint: string) {
    super(message);
    this.name = 'HarpAPIError';
    this.status = status;
    this.kind = kind;
    this.hint = hint;
  }
}

function isErrorBody(
  body: unknown
): body is { error: { kind: string; message: string; hint?: string } } {
  if (typeof body !== 'object' || body === null || !('error' in body)) {
    return false;
  }
  const error = (body as { error: unknown }).error;
  return (
    typeof error === 'object' &&
    error !== null &&
    typeof (error as { kind?: unknown }).kind === 'string' &&
    typeof (error as { message?: unknown }).message === 'string'
  );
}

/** The error for a reply that is not 2xx, from its status and (maybe JSON) body. */
export function errorFromResponse(status: number, bodyText: string): HarpAPIError {
  let body: unknown = null;
  try {
    body = JSON.parse(bodyText);
  } catch {
    // not JSON: a proxy's or tornado's HTML page
  }
  if (isErrorBody(body)) {
    return new HarpAPIError(status, body.error.kind, body.error.message, body.error.hint ?? '');
  }
  if (status === 404) {
    return new HarpAPIError(
      status,
      'ServerExtensionMissing',
      'The HARP server extension does not answer at /harp/api.',
      'Install harp-jupyter in the Python environment that runs JupyterLab, check that ' +
        '`jupyter server extension list` shows harp_jupyter enabled, then restart JupyterLab.'
    );
  }
  if (status === 401 || status === 403) {
    return new HarpAPIError(
      status,
      'NotAuthorized',
      `The server refused the request (HTTP ${status}).`,
      'Your JupyterLab session may have expired: reload the page and log in again.'
    );
  }
  return new HarpAPIError(
    status,
    'HTTPError',
    `The server answered HTTP ${status}.`,
    'Look at the JupyterLab server log for the reason.'
  );
}

/** Call `/harp/api/<endPoint>` and return its JSON. */
export async function requestAPI<T>(
  endPoint: string,
  init: RequestInit = {},
  settings: ServerConnection.ISettings = ServerConnection.makeSettings()
): Promise<T> {
  const url = URLExt.join(settings.baseUrl, API_ROOT, endPoint);
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (error) {
    throw new HarpAPIError(
      0,
      'NetworkError',
      `The Jupyter server did not answer: ${String(error)}`,
      'Check that JupyterLab’s server is still running, then press refresh.'
    );
  }
  const text = await response.text();
  if (!response.ok) {
    throw errorFromResponse(response.status, text);
  }
  try {
    return JSON.parse(text) as T;
  } catch {
    throw new HarpAPIError(
      response.status,
      'BadReply',
      `The server's reply to ${endPoint} is not JSON.`,
      'Check that the harp-jupyter Python package and this lab extension are the same version.'
    );
  }
}

/** The server API the model uses, bound to one set of server settings. */
export class ServerLeaseAPI implements ILeaseAPI {
  constructor(
    private readonly _settings: ServerConnection.ISettings = ServerConnection.makeSettings()
  ) {}

  getKernels(): Promise<IKernelsReply> {
    return requestAPI<IKernelsReply>('kernels', {}, this._settings);
  }

  getPool(): Promise<IPoolReply> {
    return requestAPI<IPoolReply>('pool', {}, this._settings);
  }

  lease(kernelId: string): Promise<IKernelReply> {
    return requestAPI<IKernelReply>(
      `kernels/${encodeURIComponent(kernelId)}/lease`,
      { method: 'POST' },
      this._settings
    );
  }

  release(kernelId: string): Promise<IKernelReply> {
    return requestAPI<IKernelReply>(
      `kernels/${encodeURIComponent(kernelId)}/release`,
      { method: 'POST' },
      this._settings
    );
  }
}
