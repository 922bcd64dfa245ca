import { unimplemented } from '../../common/errors.js';
import type { ImageServiceImplementation } from '../../gen/metalcast/v1/image.js';

const notYet = (what: string) => unimplemented(`${what} is not implemented in this controller version yet (image store)`);

/** Placeholder until the image store lands: every call says so clearly. */
export function createImageService(): ImageServiceImplementation {
  return {
    async uploadImage() {
      throw notYet('UploadImage');
    },
    async importImage() {
      throw notYet('ImportImage');
    },
    async getImage() {
      throw notYet('GetImage');
    },
    async listImages() {
      throw notYet('ListImages');
    },
    async deleteImage() {
      throw notYet('DeleteImage');
    },
  };
}
