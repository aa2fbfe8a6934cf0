import assert from 'node:assert/strict';
import { test } from 'node:test';

import { HarpAPIError, errorFromResponse } from '../requests';

test('the contract’s error JSON becomes a typed error with its hint', () => {
  const body = JSON.stringify({
    error: { kind: 'KernelBusy', message: 'GPU work is running', hint: 'try again when the cell ends' }
  });
  const error = errorFromResponse(409, body);
  assert.ok(error instanceof HarpAPIError);
  assert.equal(error.status, 409);
  assert.equal(error.kind, 'KernelBusy');
  assert.equal(error.message, 'GPU work is running');
  assert.equal(error.hint, 'try again when the cell ends');
});

test('a 404 page without error JSON means the server extension is missing', () => {
  const error = errorFromResponse(404, '<html>404: Not Found</html>');
  assert.equal(error.kind, 'ServerExtensionMissing');
  assert.match(error.hint, /jupyter server extension list/);
});

test('other replies without error JSON still say what to do', () => {
  assert.equal(errorFromResponse(403, '').kind, 'NotAuthorized');
  const error = errorFromResponse(502, 'Bad gateway');
  assert.equal(error.kind, 'HTTPError');
  assert.match(error.message, /502/);
  assert.ok(error.hint.length > 0);
});
