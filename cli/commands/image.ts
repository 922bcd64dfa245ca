import { createHash, type Hash } from 'node:crypto';
import { type FileHandle, open, rename, rm, stat } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { basename } from 'node:path';
import { isAbortError } from 'abort-controller-x';
import { SingleBar } from 'cli-progress';
import { type Command, InvalidArgumentError } from 'commander';
import { ClientError, Status, waitForChannelReady } from 'nice-grpc';
import { describeError } from '../../common/errors.js';
import { UploadChunkPool } from '../../common/upload-image-codec.js';
import { type Image, ImageFormat, ImageState, type UploadImageRequest } from '../../gen/metalcast/v1/image.js';
import { type OperatorClients, withClient } from '../client.js';
import { registerImageMakeTestCommand } from './image-make-test.js';
import { CliFailure } from '../errors.js';
import { EXIT } from '../../common/exit-codes.js';
import { formatBytes, formatTime, printFields, printJson, printTable } from '../output.js';

/**
 * Bytes per upload message. The controller accepts messages up to 8 MiB;
 * GRPC-NOTES.md measured 256 KiB to 3.5 MiB within 10 % of each other, and
 * 1 MiB keeps what the server may buffer per stalled stream small.
 */
const UPLOAD_CHUNK_BYTES = 1024 * 1024;
const IMPORT_POLL_MS = 1000;
/** A download that receives nothing for this long is abandoned and resumed. */
const DOWNLOAD_STALL_MS = 30_000;
/** Calls in a row without progress before a download gives up. */
const DOWNLOAD_ATTEMPTS = 8;

const stateName = (state: ImageState) =>
  state === ImageState.IMAGE_STATE_UNSPECIFIED ? '-' : (ImageState[state] ?? String(state)).replace('IMAGE_STATE_', '').toLowerCase();

const formatName = (format: ImageFormat) =>
  format === ImageFormat.IMAGE_FORMAT_UNSPECIFIED
    ? '-'
    : (ImageFormat[format] ?? String(format)).replace('IMAGE_FORMAT_', '').toLowerCase();

function imageJson(image: Image) {
  return { ...image, state: stateName(image.state), format: formatName(image.format) };
}

/** "qcow2 (120.0 MiB, sha256 ab12…) converted to raw" or "raw", with where the data lies. */
function formatLine(image: Image): string {
  if (image.format === ImageFormat.IMAGE_FORMAT_UNSPECIFIED) return '-';
  const allocated =
    image.allocatedBytes > 0 && image.sizeBytes > 0
      ? `; ${formatBytes(image.allocatedBytes)} of data in ${image.allocatedExtentCount} extents (${((100 * image.allocatedBytes) / image.sizeBytes).toFixed(1)}%), the rest zeros`
      : '';
  if (image.format === ImageFormat.IMAGE_FORMAT_QCOW2) {
    return `qcow2 as sent (${formatBytes(image.sourceSizeBytes)}, sha256 ${image.sourceSha256}), stored as raw${allocated}`;
  }
  return `raw${allocated}`;
}

function printImage(image: Image): void {
  printFields([
    ['name', image.name],
    ['state', stateName(image.state)],
    ['size', image.sizeBytes ? `${formatBytes(image.sizeBytes)} (${image.sizeBytes} bytes)` : '-'],
    ['sha256', image.sha256 || '-'],
    ['format', formatLine(image)],
    ['manifest', manifestLine(image)],
    ['source', image.sourceUrl || 'upload'],
    ['error', image.error || '-'],
    ['created', formatTime(image.createdAt)],
  ]);
}

/** The chunk manifest: chunk size, count and root digest (docs/chunk-manifest.md). */
function manifestLine(image: Image): string {
  if (image.manifestChunkCount === 0 || image.manifestRootSha256 === '') return '-';
  return `${image.manifestChunkCount} chunks of ${formatBytes(image.manifestChunkSizeBytes)}, root ${image.manifestRootSha256}`;
}

function parseSha256(value: string): string {
  const hex = value.toLowerCase();
  if (!/^[0-9a-f]{64}$/.test(hex)) throw new InvalidArgumentError(`'${value}' is not a sha256 (64 hex digits, as sha256sum prints)`);
  return hex;
}

/** Progress on stderr: a bar on a terminal, nothing otherwise (the result line says it all). */
function transferProgress(total: number, name: string, start = 0) {
  if (!process.stderr.isTTY) return { update: (_done: number) => {}, stop: () => {} };
  const bar = new SingleBar({
    stream: process.stderr,
    format: `${name} [{bar}] {percentage}% | {done} of {size} | {rate}/s | eta {eta_formatted}`,
    hideCursor: true,
    clearOnComplete: true,
    etaBuffer: 50,
  });
  const started = Date.now();
  bar.start(total, start, { done: formatBytes(start), size: formatBytes(total), rate: formatBytes(0) });
  return {
    update: (done: number) => {
      const seconds = Math.max(0.001, (Date.now() - started) / 1000);
      bar.update(done, { done: formatBytes(done), rate: formatBytes((done - start) / seconds) });
    },
    stop: () => bar.stop(),
  };
}

async function uploadCommand(file: string, opts: { name: string; sha256?: string }, command: Command): Promise<void> {
  await withClient(command, async ({ channel, images }, { json, timeout }) => {
    const info = await stat(file).catch((error: NodeJS.ErrnoException) => {
      throw new CliFailure(`cannot read ${file}: ${error.code === 'ENOENT' ? 'no such file' : error.message}`, EXIT.USAGE);
    });
    if (!info.isFile()) throw new CliFailure(`${file} is not a regular file`, EXIT.USAGE);
    if (info.size === 0) throw new CliFailure(`${file} is empty; an image needs content`, EXIT.USAGE);

    // A deadline for getting connected; the upload itself may take as long as it takes.
    await waitForChannelReady(channel, new Date(Date.now() + timeout)).catch(() => {
      // As a failed call would: describeFailure then probes the address for the reason (down, wrong port, TLS mismatch).
      throw new ClientError('/metalcast.v1.ImageService/UploadImage', Status.UNAVAILABLE, `No connection established within ${timeout} ms`);
    });

    // With --sha256 the controller refuses content that differs from it before keeping anything: that is the
    // end-to-end check, and hashing here too would only spend a core-second per GiB beside the controller's.
    const hash = opts.sha256 ? undefined : createHash('sha256');
    const progress = transferProgress(info.size, opts.name);
    const started = Date.now();
    let sent = 0;
    async function* requests(): AsyncGenerator<UploadImageRequest> {
      yield { part: { $case: 'header', value: { name: opts.name, sha256: opts.sha256 ?? '', sizeBytes: info.size } } };
      // Read to the end of the file, not to the size stat gave: a file that grew is refused by the size check.
      const handle = await open(file, 'r');
      // Each chunk is read into the buffer it is sent from, with room for the frame, and that buffer is read
      // into again once grpc-js has written it out (common/upload-image-codec.ts).
      const chunks = new UploadChunkPool(UPLOAD_CHUNK_BYTES);
      const readAt = async (position: number): Promise<Buffer> => {
        const buffer = chunks.take(UPLOAD_CHUNK_BYTES);
        let filled = 0;
        while (filled < buffer.length) {
          const { bytesRead } = await handle.read(buffer, filled, buffer.length - filled, position + filled);
          if (bytesRead === 0) break;
          filled += bytesRead;
        }
        return filled === buffer.length ? buffer : buffer.subarray(0, filled);
      };
      // One read ahead: the next chunk comes off the disk while this one is hashed and sent. Its failure,
      // should nothing await it any more (a cancelled upload), is handled here; it is thrown where awaited.
      const readAhead = (position: number) => {
        const read = readAt(position);
        read.catch(() => {});
        return read;
      };
      try {
        let next: Promise<Buffer> | undefined = readAhead(0);
        while (next) {
          const chunk: Buffer = await next;
          if (chunk.length === 0) break;
          const last = chunk.length < UPLOAD_CHUNK_BYTES;
          next = last ? undefined : readAhead(sent + chunk.length);
          hash?.update(chunk);
          sent += chunk.length;
          progress.update(sent);
          yield { part: { $case: 'data', value: chunk } };
        }
      } finally {
        await handle.close();
      }
    }

    const cancel = new AbortController();
    const onInterrupt = () => cancel.abort();
    process.once('SIGINT', onInterrupt);
    let image: Image | undefined;
    try {
      ({ image } = await images.uploadImage(requests(), { deadline: undefined, signal: cancel.signal }));
    } catch (error) {
      if (cancel.signal.aborted && isAbortError(error)) {
        throw new Error(`upload of ${file} cancelled after ${formatBytes(sent)}; the controller keeps nothing of it`);
      }
      throw error;
    } finally {
      process.removeListener('SIGINT', onInterrupt);
      progress.stop();
    }
    if (!image) throw new Error('the controller returned no image');

    // End-to-end check: the file is read once, so its sha256 is known only now (or was given). A qcow2 is
    // stored converted to raw; what the controller received is its source checksum.
    const local = hash ? hash.digest('hex') : (opts.sha256 as string);
    const received = image.sourceSha256 || image.sha256;
    const receivedBytes = image.sourceSizeBytes || image.sizeBytes;
    if (received !== local || sent !== info.size) {
      await images.deleteImage({ name: opts.name }).catch(() => {});
      throw new Error(
        `the controller received ${receivedBytes} bytes with sha256 ${received}, but this side read ${sent} bytes with sha256 ${local}; ` +
          `image ${opts.name} was deleted again. Was ${file} modified during the upload? Upload it again.`,
      );
    }
    if (json) return printJson(imageJson(image));
    const seconds = (Date.now() - started) / 1000;
    process.stdout.write(
      `uploaded ${basename(file)} as image ${image.name}: ${formatBytes(sent)} in ${seconds.toFixed(1)}s ` +
        `(${formatBytes(sent / Math.max(seconds, 0.001))}/s), sha256 ${local}\n`,
    );
    if (image.format === ImageFormat.IMAGE_FORMAT_QCOW2) {
      process.stdout.write(`  qcow2, stored as raw: ${formatBytes(image.sizeBytes)}, sha256 ${image.sha256}; ${formatLine(image)}\n`);
    }
  });
}

/** Answers that a retry cannot change: the image is gone, not ready, or the request is wrong. */
const DOWNLOAD_FATAL = new Set([
  Status.NOT_FOUND,
  Status.FAILED_PRECONDITION,
  Status.INVALID_ARGUMENT,
  Status.DATA_LOSS,
  Status.PERMISSION_DENIED,
  Status.UNAUTHENTICATED,
  Status.UNIMPLEMENTED,
]);

class DownloadStalled extends Error {
  override name = 'DownloadStalled';
}

/** The image changed under a resumed download: resuming cannot give a consistent file. */
class ImageChanged extends Error {
  override name = 'ImageChanged';
}

interface DownloadState {
  offset: number;
  /** From the first header: what every later call must agree with. */
  sizeBytes?: number;
  sha256?: string;
}

/**
 * One DownloadImage call from `state.offset`: checks the header against the
 * first one, writes and hashes the chunks in order. A per-message timer
 * catches a stall; --timeout does not bound the download itself.
 */
async function downloadOnce(
  images: OperatorClients['images'],
  name: string,
  file: FileHandle,
  hash: Hash,
  state: DownloadState,
  onHeader: (sizeBytes: number) => void,
  onProgress: (offset: number) => void,
  signal: AbortSignal,
): Promise<void> {
  const call = new AbortController();
  const onAbort = () => call.abort(signal.reason);
  signal.addEventListener('abort', onAbort, { once: true });
  const stalled = new DownloadStalled(`nothing received for ${DOWNLOAD_STALL_MS / 1000}s`);
  const timer = setTimeout(() => call.abort(stalled), DOWNLOAD_STALL_MS);
  try {
    for await (const message of images.downloadImage({ name, offset: state.offset }, { deadline: undefined, signal: call.signal })) {
      timer.refresh();
      const part = message.part;
      if (part?.$case === 'header') {
        const { sizeBytes, sha256, offset } = part.value;
        if (state.sha256 === undefined) {
          state.sha256 = sha256;
          state.sizeBytes = sizeBytes;
          onHeader(sizeBytes);
        } else if (state.sha256 !== sha256 || state.sizeBytes !== sizeBytes) {
          throw new ImageChanged(
            `image ${name} changed during the download (now ${sizeBytes} bytes with sha256 ${sha256}, it was ${state.sizeBytes} bytes with sha256 ${state.sha256}); download it again`,
          );
        }
        if (offset !== state.offset) throw new Error(`the controller started at ${offset} where ${state.offset} was asked`);
        continue;
      }
      if (part?.$case !== 'chunk' || state.sizeBytes === undefined) throw new Error('the controller sent data before the header');
      const { offset, data } = part.value;
      if (offset !== state.offset || data.byteLength === 0 || offset + data.byteLength > state.sizeBytes) {
        throw new Error(`the controller sent ${data.byteLength} bytes at ${offset} where ${state.offset} was expected`);
      }
      hash.update(data);
      let written = 0;
      while (written < data.byteLength) {
        const { bytesWritten } = await file.write(data, written, data.byteLength - written, offset + written);
        written += bytesWritten;
      }
      state.offset += data.byteLength;
      onProgress(state.offset);
      timer.refresh(); // the local write is not the controller's silence
    }
  } catch (error) {
    if (call.signal.reason === stalled) throw stalled;
    throw error;
  } finally {
    clearTimeout(timer);
    signal.removeEventListener('abort', onAbort);
  }
}

async function downloadCommand(name: string, opts: { output: string; force?: boolean }, command: Command): Promise<void> {
  await withClient(command, async ({ channel, images }, { json, timeout }) => {
    const output = opts.output;
    if (
      !opts.force &&
      (await stat(output).then(
        () => true,
        () => false,
      ))
    ) {
      throw new CliFailure(`${output} already exists; choose another --output, or add --force to replace it`, EXIT.FAILED);
    }
    await waitForChannelReady(channel, new Date(Date.now() + timeout)).catch(() => {
      // As a failed call would: describeFailure then probes the address for the reason (down, wrong port, TLS mismatch).
      throw new ClientError(
        '/metalcast.v1.ImageService/DownloadImage',
        Status.UNAVAILABLE,
        `No connection established within ${timeout} ms`,
      );
    });

    // Beside the output, so that the final rename is atomic: the output never holds a partial or unverified image.
    const partial = `${output}.part`;
    const file = await open(partial, 'w').catch((error: NodeJS.ErrnoException) => {
      throw new Error(`cannot write ${partial}: ${error.message}`);
    });
    const hash = createHash('sha256');
    const state: DownloadState = { offset: 0 };
    const cancel = new AbortController();
    const onInterrupt = () => cancel.abort(new Error('interrupted'));
    process.once('SIGINT', onInterrupt);
    let progress = { update: (_done: number) => {}, stop: () => {} };
    const started = Date.now();
    let resumes = 0;
    let fruitless = 0;
    let done = false;
    try {
      for (;;) {
        const before = state.offset;
        try {
          await downloadOnce(
            images,
            name,
            file,
            hash,
            state,
            (size) => {
              progress = transferProgress(size, name);
            },
            (offset) => progress.update(offset),
            cancel.signal,
          );
          if (state.sizeBytes !== undefined && state.offset === state.sizeBytes) break;
          // Count bytes, not statuses: a stream may end OK short of the image.
          throw new Error(`the stream ended at ${state.offset} of ${state.sizeBytes ?? '?'} bytes`);
        } catch (error) {
          if (cancel.signal.aborted) throw new Error(`download of image ${name} cancelled at ${formatBytes(state.offset)}; nothing kept`);
          if (error instanceof ImageChanged || (error instanceof ClientError && DOWNLOAD_FATAL.has(error.code))) throw error;
          // A call that moved forward resets the count: a long download on a flaky link goes on as long as it advances.
          fruitless = state.offset > before ? 1 : fruitless + 1;
          if (fruitless >= DOWNLOAD_ATTEMPTS) {
            throw new Error(
              `download of image ${name} gave up after ${fruitless} attempts in a row without progress, at ${state.offset} of ${state.sizeBytes ?? '?'} bytes: ${describeError(error)}`,
            );
          }
          resumes++;
          const delay = Math.min(30_000, 1000 * 2 ** (fruitless - 1)) * (0.5 + Math.random());
          if (!process.stderr.isTTY || json) {
            process.stderr.write(
              `download interrupted at ${state.offset} bytes (${describeError(error)}); resuming in ${(delay / 1000).toFixed(1)}s\n`,
            );
          }
          await sleep(delay, undefined, { signal: cancel.signal }).catch(() => {});
        }
      }
      progress.stop();
      const digest = hash.digest('hex');
      if (digest !== state.sha256) {
        throw new Error(
          `the downloaded data hashes to ${digest}, but image ${name} has sha256 ${state.sha256}; nothing kept, download it again`,
        );
      }
      await file.sync();
      await file.close();
      await rename(partial, output);
      done = true;
    } finally {
      process.removeListener('SIGINT', onInterrupt);
      progress.stop();
      if (!done) {
        await file.close().catch(() => {});
        await rm(partial, { force: true });
      }
    }
    const size = state.sizeBytes ?? 0;
    if (json) return printJson({ name, output, sizeBytes: size, sha256: state.sha256, resumes });
    const seconds = (Date.now() - started) / 1000;
    process.stdout.write(
      `downloaded image ${name} to ${output}: ${formatBytes(size)} in ${seconds.toFixed(1)}s ` +
        `(${formatBytes(size / Math.max(seconds, 0.001))}/s), sha256 ${state.sha256} verified` +
        `${resumes > 0 ? `, ${resumes} resumes` : ''}\n`,
    );
  });
}

async function importCommand(
  url: string,
  opts: { name: string; checksum: string; manifestRoot?: string; wait?: boolean },
  command: Command,
): Promise<void> {
  await withClient(command, async ({ images }, { json }) => {
    const { image: started } = await images.importImage({
      name: opts.name,
      url,
      checksum: opts.checksum,
      manifestRootSha256: opts.manifestRoot ?? '',
    });
    if (!started) throw new Error('the controller returned no image');
    if (!opts.wait) {
      if (json) return printJson(imageJson(started));
      process.stdout.write(
        `importing image ${started.name} from ${started.sourceUrl}; follow it with: metalcast image show ${started.name}\n`,
      );
      return;
    }
    const tty = process.stderr.isTTY && !json;
    const begin = Date.now();
    let image = started;
    while (image.state === ImageState.IMAGE_STATE_IMPORTING) {
      if (tty) process.stderr.write(`\rimporting ${image.name} from ${image.sourceUrl} … ${Math.round((Date.now() - begin) / 1000)}s `);
      await new Promise((resolve) => setTimeout(resolve, IMPORT_POLL_MS));
      const { image: latest } = await images.getImage({ name: opts.name });
      if (!latest) throw new Error('the controller returned no image');
      image = latest;
    }
    if (tty) process.stderr.write('\n');
    if (json) printJson(imageJson(image));
    if (image.state !== ImageState.IMAGE_STATE_READY) {
      process.stderr.write(`error: import of image ${image.name} failed: ${image.error || stateName(image.state)}\n`);
      process.exitCode = 1;
      return;
    }
    if (!json) {
      process.stdout.write(
        `imported image ${image.name}: ${formatBytes(image.sizeBytes)} in ${Math.round((Date.now() - begin) / 1000)}s, sha256 ${image.sha256}\n`,
      );
    }
  });
}

/** `metalcast image …`: the operator commands for images. */
export function registerImageCommands(program: Command, addOperatorOptions: (command: Command) => Command): void {
  const image = addOperatorOptions(program.command('image')).description('upload, import, list and delete OS images in the controller');

  image
    .command('upload')
    .description('upload an image file to the controller')
    .argument('<file>', 'image file to upload (raw or compressed as the agent expects it)')
    .requiredOption('--name <name>', 'unique image name (1 to 63 letters, digits, ".", "_" or "-")')
    .option('--sha256 <hex>', 'expected sha256 of the file: the controller refuses the upload if the content differs', parseSha256)
    .addHelpText(
      'after',
      `
The file is read once and sent in ${UPLOAD_CHUNK_BYTES / 1024 / 1024} MiB messages. Without --sha256, its sha256 is
computed while it is read and compared with what the controller stored when the upload ends; on a
mismatch the image is deleted again and the command fails. With --sha256 (from the image's build,
SHA256SUMS) the controller verifies the content against it before it keeps anything, and this
side does not hash the file again: the faster way on a busy machine. A cancelled or broken upload (Ctrl-C, lost connection) leaves nothing
on the controller. --timeout bounds connecting only, not the upload itself.
`,
    )
    .action(uploadCommand);

  image
    .command('import')
    .description('have the controller download an image from an http(s) URL and verify it')
    .argument('<url>', 'http or https URL of the image')
    .requiredOption('--name <name>', 'unique image name')
    .requiredOption('--checksum <algo:hex>', 'expected checksum: sha256:<64 hex> or sha512:<128 hex>')
    .option(
      '--manifest-root <hex>',
      "expected root digest of the image's chunk manifest (as `image show` prints it): the import fails if the content's differs",
      parseSha256,
    )
    .option('--wait', 'wait until the import is ready or failed (exit code 1 when it failed)')
    .addHelpText(
      'after',
      '\nThe controller retries 5xx answers, connection errors and stalls (--import-attempts); a 4xx\nanswer or a checksum mismatch fails the import at once. Without --wait, follow it with:\nmetalcast image show NAME\n',
    )
    .action(importCommand);

  image
    .command('download')
    .description('download an image from the controller into a file, verifying its sha256')
    .argument('<name>', 'image name')
    .requiredOption('--output <file>', 'file to write the image to')
    .option('--force', 'replace the output file if it exists')
    .addHelpText(
      'after',
      `
The image arrives in <file>.part beside the output, is hashed as it is written, and becomes <file>
only once every byte has arrived and its sha256 matches the controller's; otherwise nothing is kept.
A broken or stalled stream (${DOWNLOAD_STALL_MS / 1000}s without data) resumes from the bytes already
written, with jittered backoff, until ${DOWNLOAD_ATTEMPTS} attempts in a row bring nothing. UNAVAILABLE
with "being copied" means this controller has not received the image from the others yet: the command
retries, or download it from another controller. --timeout bounds connecting only.
`,
    )
    .action(downloadCommand);

  image
    .command('list')
    .description('list images')
    .action(async (_opts: unknown, command: Command) =>
      withClient(command, async ({ images }, { json }) => {
        const { images: all } = await images.listImages({});
        if (json) return printJson(all.map(imageJson));
        printTable(
          ['name', 'state', 'format', 'size', 'sha256', 'source'],
          all.map((i) => [
            i.name,
            stateName(i.state),
            formatName(i.format),
            i.sizeBytes ? formatBytes(i.sizeBytes) : '-',
            i.sha256 ? i.sha256.slice(0, 12) : '-',
            i.sourceUrl || 'upload',
          ]),
        );
      }),
    );

  image
    .command('show')
    .description('show one image')
    .argument('<name>', 'image name')
    .action(async (name: string, _opts: unknown, command: Command) =>
      withClient(command, async ({ images }, { json }) => {
        const { image: found } = await images.getImage({ name });
        if (!found) throw new Error('the controller returned no image');
        if (json) printJson(imageJson(found));
        else printImage(found);
      }),
    );

  registerImageMakeTestCommand(image);

  image
    .command('delete')
    .description('delete an image (refused while a node is being deployed with it; stops an import in progress)')
    .argument('<name>', 'image name')
    .action(async (name: string, _opts: unknown, command: Command) =>
      withClient(command, async ({ images }, { json }) => {
        await images.deleteImage({ name });
        if (json) printJson({ deleted: name });
        else process.stdout.write(`deleted image ${name}\n`);
      }),
    );
}
