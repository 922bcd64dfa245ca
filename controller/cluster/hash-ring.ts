import { createHash } from 'node:crypto';
import type { HashRange } from '../store/store.js';

/** The ring is the unsigned 32-bit integers. */
export const RING_SIZE = 2 ** 32;

/** Points each controller puts on the ring: enough that shares stay within a few percent of even. */
export const DEFAULT_POINTS_PER_MEMBER = 128;

/** Where a key sits on the ring: the first four bytes of its sha256, unsigned. */
export function ringHash(key: string): number {
  return createHash('sha256').update(key).digest().readUInt32BE(0);
}

interface Point {
  hash: number;
  member: string;
}

/**
 * A consistent hash ring over the live controllers. A node belongs to the
 * member owning the first point at or after the node's hash (wrapping
 * round), so when a member joins or leaves only the nodes next to its
 * points change hands. Stores filter by the same hashes (a column kept
 * with each node), so a controller's share can be swept in SQL.
 */
export class HashRing {
  private readonly points: Point[];
  readonly members: readonly string[];

  constructor(members: Iterable<string>, pointsPerMember = DEFAULT_POINTS_PER_MEMBER) {
    this.members = [...new Set(members)].sort();
    this.points = this.members
      .flatMap((member) => Array.from({ length: pointsPerMember }, (_, i) => ({ hash: ringHash(`${member}#${i}`), member })))
      // Ties (astronomically rare) are broken by name so that every controller builds the same ring.
      .sort((a, b) => a.hash - b.hash || a.member.localeCompare(b.member));
  }

  /** The member that owns `key`; undefined on an empty ring. */
  ownerOf(key: string): string | undefined {
    return this.ownerOfHash(ringHash(key));
  }

  ownerOfHash(hash: number): string | undefined {
    if (this.points.length === 0) return undefined;
    // Binary search for the first point at or after hash.
    let low = 0;
    let high = this.points.length;
    while (low < high) {
      const mid = (low + high) >>> 1;
      if ((this.points[mid] as Point).hash < hash) low = mid + 1;
      else high = mid;
    }
    return (this.points[low % this.points.length] as Point).member;
  }

  /**
   * The hash ranges `member` owns, merged where adjacent: each point owns
   * the hashes after the previous point up to and including its own.
   */
  rangesOf(member: string): HashRange[] {
    if (!this.members.includes(member)) return [];
    if (this.members.length === 1) return [{ from: 0, to: RING_SIZE }];
    const ranges: HashRange[] = [];
    const add = (from: number, to: number) => {
      if (from >= to) return;
      const last = ranges.at(-1);
      if (last && last.to === from) last.to = to;
      else ranges.push({ from, to });
    };
    const last = this.points.at(-1) as Point;
    for (let i = 0; i < this.points.length; i++) {
      const point = this.points[i] as Point;
      if (point.member !== member) continue;
      if (i === 0) {
        // The first point also owns the wrap-around: after the last point to the end, and from 0 up to itself.
        add(0, point.hash + 1);
        ranges.push({ from: last.hash + 1, to: RING_SIZE });
      } else {
        add((this.points[i - 1] as Point).hash + 1, point.hash + 1);
      }
    }
    return mergeRanges(ranges);
  }
}

/** Sorts and merges touching or overlapping ranges. */
function mergeRanges(ranges: HashRange[]): HashRange[] {
  const sorted = ranges.filter((r) => r.from < r.to).sort((a, b) => a.from - b.from);
  const merged: HashRange[] = [];
  for (const range of sorted) {
    const last = merged.at(-1);
    if (last && range.from <= last.to) last.to = Math.max(last.to, range.to);
    else merged.push({ ...range });
  }
  return merged;
}

/** Whether a hash lies in any of the ranges. */
export function inRanges(hash: number, ranges: readonly HashRange[]): boolean {
  return ranges.some((r) => hash >= r.from && hash < r.to);
}
