import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { grubArguments, grubConfig, kernelParameters } from '../../controller/boot/agent-iso.js';

/*
 * The agent ISO's GRUB menu: GRUB's `linux` command puts a backslash before
 * every ", ' and \ of an argument and double quotes around one with a space
 * (grub_create_loader_cmdline), so the command line goes to GRUB as the
 * kernel's parameters without their quotes; what GRUB cannot pass unchanged
 * is refused with the parameter named. test/lab/agent-iso-boot.test.ts boots
 * the ISO in SeaBIOS and OVMF and reads what the kernel got.
 */

describe('agent ISO command line', () => {
  it('splits parameters as the kernel does', () => {
    assert.deepEqual(kernelParameters(' a  b="c d" "e=f g" h="" i=j"k" '), ['a', 'b=c d', 'e=f g', 'h=', 'i=j"k"']);
  });

  it('hands GRUB each parameter unquoted, as one single-quoted word', () => {
    assert.equal(
      grubArguments('console=ttyS0 metalcast.ca_url=http://10.0.0.1:9350/ca.pem quiet metalcast.note="two words"'),
      "'console=ttyS0' 'metalcast.ca_url=http://10.0.0.1:9350/ca.pem' 'quiet' 'metalcast.note=two words'",
    );
    assert.match(grubConfig('console=ttyS0 a="b c"'), /^ {2}linux \/boot\/vmlinuz 'console=ttyS0' 'a=b c'$/m);
  });

  it('refuses what GRUB would escape, naming the parameter', () => {
    for (const [cmdline, char] of [
      ["x=it's", "'"],
      ['y=a\\b', '\\'],
      ['z=a"b"c', '"'],
    ]) {
      assert.throws(
        () => grubArguments(`console=ttyS0 ${cmdline}`),
        (error: Error) =>
          error.message.includes(`the kernel parameter ${cmdline} cannot go on the agent ISO`) &&
          error.message.includes(`before its ${char}`),
      );
    }
  });
});
