// Fake machines live with the demo, which ships with the product; tests use the same builder.
export * from '../../demo/fake-machine.js';
