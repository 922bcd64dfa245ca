import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { AsyncQueue } from '../../common/async-queue.js';

describe('AsyncQueue', () => {
  it('delivers pushed values in order to a for-await reader, then ends', async () => {
    const queue = new AsyncQueue<number>();
    queue.push(1);
    const reading = (async () => {
      const seen: number[] = [];
      for await (const value of queue) seen.push(value);
      return seen;
    })();
    queue.push(2);
    queue.push(3);
    queue.end();
    assert.deepEqual(await reading, [1, 2, 3]);
    assert.equal(queue.push(4), false, 'closed');
  });

  it('take() waits for a value, times out naming what it waited for, and loses nothing that arrives late', async () => {
    const queue = new AsyncQueue<string>();
    const waiting = queue.take(1000, 'a greeting');
    queue.push('hello');
    assert.equal(await waiting, 'hello');
    await assert.rejects(queue.take(20, 'an answer'), /no an answer within 20ms/);
    queue.push('late');
    assert.equal(await queue.take(100), 'late');
    queue.end();
    await assert.rejects(queue.take(100, 'more'), /ended while waiting for more/);
  });

  it('passes a failure to the reader after the values pushed before it', async () => {
    const queue = new AsyncQueue<number>();
    queue.push(1);
    queue.fail(new Error('broken'));
    assert.deepEqual(await queue.next(), { value: 1, done: false });
    await assert.rejects(queue.next(), /broken/);
  });

  it('drops pushes once the reader has stopped', async () => {
    const queue = new AsyncQueue<number>();
    queue.push(1);
    for await (const value of queue) {
      assert.equal(value, 1);
      break;
    }
    assert.equal(queue.closed, true);
    assert.equal(queue.push(2), false);
  });

  it('with a capacity, refuses values while that many wait unread, and takes them again once read', async () => {
    const queue = new AsyncQueue<number>(2);
    assert.equal(queue.push(1), true);
    assert.equal(queue.push(2), true);
    assert.equal(queue.push(3), false, 'full: the third is refused');
    assert.equal(queue.size, 2);
    assert.equal(await queue.take(), 1);
    assert.equal(queue.push(4), true, 'room again after a read');
    assert.deepEqual([await queue.take(), await queue.take()], [2, 4]);
  });
});
