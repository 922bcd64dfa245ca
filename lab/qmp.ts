/** The QMP client lives with the controller's qemu power driver; lab guests use the same one. */
export * from '../controller/power/qmp.js';
