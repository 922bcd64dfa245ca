/**
 * A push queue read as an async iterable. A producer pushes values when it
 * likes and ends the queue when it is done, which makes it the request side
 * of a client or bidirectional stream (`client.heartbeat(queue)`), or a
 * place for a test to collect what a stream sends back and take it one at a time.
 *
 * One reader at a time; values are delivered in order. Pushing after
 * end() or after the reader stopped (the call finished) is ignored and
 * reported by push() returning false, because a producer that races a
 * stream's end should not crash on it. With a capacity, push() also refuses
 * when that many values wait unread, so that a stuck stream cannot grow
 * memory without end (the agent's heartbeat requests).
 */
export class AsyncQueue<T> implements AsyncIterable<T> {
  private readonly values: T[] = [];

  constructor(private readonly capacity = Number.POSITIVE_INFINITY) {}

  private readonly waiters: { resolve: (result: IteratorResult<T>) => void; reject: (error: unknown) => void }[] = [];
  private ended = false;
  private failure: { error: unknown } | undefined;
  private readerGone = false;

  /** Values pushed and not yet taken. */
  get size(): number {
    return this.values.length;
  }

  /** True once end() or fail() was called or the reader stopped reading. */
  get closed(): boolean {
    return this.ended || this.failure !== undefined || this.readerGone;
  }

  /** Adds a value; false if the queue is closed or full and the value was dropped. */
  push(value: T): boolean {
    if (this.closed) return false;
    const waiter = this.waiters.shift();
    if (waiter) waiter.resolve({ value, done: false });
    else if (this.values.length >= this.capacity) return false;
    else this.values.push(value);
    return true;
  }

  /** Ends the queue: the reader gets the values already pushed, then done. */
  end(): void {
    if (this.closed) return;
    this.ended = true;
    if (this.values.length === 0) for (const waiter of this.waiters.splice(0)) waiter.resolve({ value: undefined, done: true });
  }

  /** Ends the queue with an error, thrown to the reader after the values already pushed. */
  fail(error: unknown): void {
    if (this.closed) return;
    this.failure = { error };
    if (this.values.length === 0) for (const waiter of this.waiters.splice(0)) waiter.reject(error);
  }

  /** The next value, waiting for it if needed. */
  next(): Promise<IteratorResult<T>> {
    if (this.values.length > 0) return Promise.resolve({ value: this.values.shift() as T, done: false });
    if (this.failure) return Promise.reject(this.failure.error);
    if (this.ended || this.readerGone) return Promise.resolve({ value: undefined, done: true });
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
  }

  /**
   * The next value; rejects if none arrives within `timeoutMs` or the queue
   * ends first, with `what` in the message so that a failing test says what
   * it was waiting for.
   */
  take(timeoutMs = 5000, what = 'a value'): Promise<T> {
    if (this.values.length > 0) return Promise.resolve(this.values.shift() as T);
    if (this.failure) return Promise.reject(this.failure.error);
    if (this.ended || this.readerGone) return Promise.reject(new Error(`the queue ended while waiting for ${what}`));
    return new Promise<T>((resolve, reject) => {
      const waiter = {
        resolve: (result: IteratorResult<T>) => {
          clearTimeout(timer);
          if (result.done) reject(new Error(`the queue ended while waiting for ${what}`));
          else resolve(result.value);
        },
        reject: (error: unknown) => {
          clearTimeout(timer);
          reject(error);
        },
      };
      // On timeout the waiter leaves the line, so that a later value is not lost.
      const timer = setTimeout(() => {
        const index = this.waiters.indexOf(waiter);
        if (index >= 0) this.waiters.splice(index, 1);
        reject(new Error(`no ${what} within ${timeoutMs}ms`));
      }, timeoutMs);
      this.waiters.push(waiter);
    });
  }

  [Symbol.asyncIterator](): AsyncIterator<T> {
    return {
      next: () => this.next(),
      return: async () => {
        this.readerGone = true;
        this.values.length = 0;
        for (const waiter of this.waiters.splice(0)) waiter.resolve({ value: undefined, done: true });
        return { value: undefined, done: true };
      },
    };
  }
}
