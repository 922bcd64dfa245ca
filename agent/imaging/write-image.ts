import type { Logger } from '../../common/logging.js';
import type { CommandProgress, WriteImageResult } from '../../gen/metalcast/v1/command.js';
import { writeImageByChunks } from './chunked-writer.js';
import { statImageFor, type WriteImageOptions, type WriteImageTarget, writeImageStream } from './image-writer.js';
import type { ImageSource } from './image-source.js';

/**
 * write_image's choice of writer. An image with a chunk manifest is written chunk by chunk
 * (chunked-writer.ts: each chunk verified on arrival, only what the disk lacks fetched); one
 * without (a controller from before manifests) as one resumable stream (image-writer.ts).
 * It sits apart from both so that neither writer imports the other.
 */
export async function writeImage(
  source: ImageSource,
  target: WriteImageTarget,
  options: WriteImageOptions,
  report: (progress: Partial<CommandProgress>) => void,
  signal: AbortSignal,
  logger: Logger,
): Promise<WriteImageResult> {
  const stat = await statImageFor(source, target, options, signal, logger);
  if (stat.manifestChunkCount > 0 && source.manifest) {
    return writeImageByChunks(source, target, options, report, signal, logger, stat);
  }
  return writeImageStream(source, target, options, report, signal, logger, stat);
}
