/** The iPXE scripts live with the controller's boot endpoint; the lab's stand-in server uses the same ones. */
export * from '../controller/boot/ipxe.js';
